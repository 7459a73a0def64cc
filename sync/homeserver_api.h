/*
 * mx_hs_api: what the sync adapter asks of the homeserver, as an
 * interface. sync/ names the calls it needs; the homeserver side
 * (homeserver/client_api.c) is the one place that knows their URLs,
 * headers and transport, and implements this table. Tests implement it
 * with a fake (tests/unit/hub_fake.c).
 */
#ifndef MX_HOMESERVER_API_H
#define MX_HOMESERVER_API_H

#include <stdbool.h>
#include <stddef.h>

typedef enum mx_hs_call {
  MX_HS_SYNC,           /* GET /sync with the fields below */
  MX_HS_WHOAMI,         /* GET /account/whoami */
  MX_HS_JOINED_ROOMS,   /* GET /joined_rooms */
  MX_HS_JOINED_MEMBERS, /* GET /rooms/{room_id}/joined_members */
} mx_hs_call;

typedef struct mx_hs_request {
  mx_hs_call call;
  const char *token;      /* access token, sent as a Bearer header */
  const char *peer_ip;    /* the client, for X-Forwarded-For; may be NULL */
  const char *user_agent; /* may be NULL */
  /* MX_HS_JOINED_MEMBERS */
  const char *room_id;
  size_t room_len;
  /* MX_HS_SYNC */
  const char *query;      /* forwarded parameters, encoded, no since/timeout */
  const char *since;      /* NULL: initial sync */
  long timeout_ms;        /* 0: answer at once */
  bool full_state;
  bool presence_off;      /* send set_presence=offline, whatever query says */
} mx_hs_request;

typedef struct mx_hs_response {
  int status;          /* HTTP status; 0 when the transfer failed */
  int err;             /* MX_ERR_* when status is 0 */
  const char *body;    /* borrowed for the callback */
  size_t len;
  long retry_after_ms; /* from a 429 body, else -1 */
} mx_hs_response;

typedef void (*mx_hs_done_fn)(void *ud, const mx_hs_response *resp);

typedef struct mx_hs_api {
  /* Starts a call; done is called once, later (never from inside start),
   * unless cancelled. Returns 0 with *handle set, MX_ERR_LIMIT when the
   * request cannot be sent as given (a URL over the client's cap: retrying
   * cannot help) or MX_ERR_NOMEM. */
  int (*start)(void *impl, const mx_hs_request *req, mx_hs_done_fn done,
               void *ud, void **handle);
  void (*cancel)(void *impl, void *handle);
  void *impl;
} mx_hs_api;

#endif
