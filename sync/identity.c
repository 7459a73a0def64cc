/*
 * Identities (replication mode): who a token belongs to, resolved once
 * per token (account/whoami, then joined_rooms for the first device of a
 * user, to seed the room index), and the streams of each user, which is
 * what a wake names.
 */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "sync/hub_internal.h"
#include "sync/json_scan.h"

void identity_user_link(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  identity *id = st->id;
  if (mx_list_linked(&st->unode) || !id || !id->user)
    return;
  user_entry *u = mx_strmap_get(&hub->users, id->user, id->ulen);
  if (!u) {
    u = calloc(1, sizeof(*u));
    if (!u || mx_strmap_put(&hub->users, id->user, id->ulen, u, NULL)) {
      free(u);
      return; /* out of memory: the stream is only reached by safety nets */
    }
    mx_list_init(&u->streams);
  }
  mx_list_push_front(&u->streams, &st->unode);
  u->count++;
  const mx_sync_presence_ops *p = &hub->presence_ops;
  if (st->presence && id->device && p->open)
    st->relayed = p->open(p->ud, id->user, id->ulen, id->device, id->dlen,
                          st->online) == 0;
  hub->nrelayed += st->relayed;
}

static void user_unlink(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  if (!mx_list_linked(&st->unode))
    return;
  identity *id = st->id;
  mx_list_remove(&st->unode);
  const mx_sync_presence_ops *p = &hub->presence_ops;
  if (st->relayed && p->close)
    p->close(p->ud, id->user, id->ulen, id->device, id->dlen, st->online);
  hub->nrelayed -= st->relayed;
  st->relayed = false;
  user_entry *u = mx_strmap_get(&hub->users, id->user, id->ulen);
  if (!u || --u->count)
    return;
  mx_strmap_del(&hub->users, id->user, id->ulen);
  free(u);
  if (hub->hooks.user_close)
    hub->hooks.user_close(id->user, id->ulen, hub->hooks.ud);
}

static void identity_step(identity *id);

static void identity_free(identity *id) {
  mx_sync_hub *hub = id->hub;
  if (id->handle)
    hub->api.cancel(hub->api.impl, id->handle);
  mx_strmap_del(&hub->identities, id->token, strlen(id->token));
  free(id->token);
  free(id->user);
  free(id->device);
  free(id->error_body);
  free(id);
}

void identity_unref(mx_sync_stream *st) {
  identity *id = st->id;
  if (!id)
    return;
  user_unlink(st);
  mx_list_remove(&st->inode);
  st->id = NULL;
  if (mx_list_empty(&id->streams))
    identity_free(id);
}

/* Every stream of the identity may go on (or take its error). */
static void identity_settled(identity *id) {
  MX_LIST_FOREACH_SAFE(n, nx, &id->streams) {
    mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, inode);
    if (id->user)
      identity_user_link(st);
    hub_kick(st);
  }
}

static void identity_failed(identity *id) {
  id->failed = true;
  id->step = 2;
  identity_settled(id);
}

static void identity_done(void *ud, const mx_hs_response *resp) {
  identity *id = ud;
  mx_sync_hub *hub = id->hub;
  id->handle = NULL;
  if (resp->status >= 400 && resp->status < 500 && resp->status != 429) {
    /* The token itself is refused: that is every stream's answer. */
    id->error_status = resp->status;
    id->error_body = malloc(resp->len ? resp->len : 1);
    if (id->error_body) {
      memcpy(id->error_body, resp->body, resp->len);
      id->error_len = resp->len;
    }
    id->step = 2;
    identity_settled(id);
    return;
  }
  if (resp->status != 200 || !hub_is_json_object(resp->body, resp->len)) {
    /* Transient: these streams long-poll (or, without the fallback, wait
     * for safety nets) rather than fail. */
    MX_LOG_WARN("sync.identity_failed", "status=%d step=%d", resp->status,
                id->step);
    /* Without the user's rooms the index cannot wake them: treat the
     * user as unknown (long-polls), and let the next device retry. */
    free(id->user);
    id->user = NULL;
    id->ulen = 0;
    free(id->device);
    id->device = NULL;
    identity_failed(id);
    return;
  }
  if (id->step == 0) {
    static const char *const path[] = {"user_id"};
    mx_json_span v;
    const char *u;
    size_t ulen;
    bool esc;
    if (mx_json_scan_find(resp->body, resp->len, path, 1, &v) == 0 &&
        v.type == MX_JSON_STRING &&
        mx_json_scan_string(&v, &u, &ulen, &esc) == 0 && !esc && ulen &&
        (id->user = strndup(u, ulen))) {
      id->ulen = ulen;
      /* The device, for the presence relay (absent for appservice and
       * some guest tokens: such streams keep syncing). */
      static const char *const dpath[] = {"device_id"};
      const char *d;
      size_t dlen;
      if (mx_json_scan_find(resp->body, resp->len, dpath, 1, &v) == 0 &&
          v.type == MX_JSON_STRING &&
          mx_json_scan_string(&v, &d, &dlen, &esc) == 0 && !esc && dlen &&
          (id->device = strndup(d, dlen)))
        id->dlen = dlen;
      if (mx_strmap_get(&hub->users, u, ulen)) {
        id->step = 2; /* another device of the user: rooms are known */
        identity_settled(id);
        return;
      }
      id->step = 1;
      identity_step(id);
      return;
    }
    identity_failed(id);
    return;
  }
  /* joined_rooms: the index starts from the full list, so a stream that
   * resumes from an old position is woken for rooms it joined long ago. */
  id->step = 2;
  if (hub->hooks.user_open && !mx_strmap_get(&hub->users, id->user, id->ulen))
    hub->hooks.user_open(id->user, id->ulen, resp->body, resp->len,
                         hub->hooks.ud);
  identity_settled(id);
}

static void identity_step(identity *id) {
  mx_sync_hub *hub = id->hub;
  mx_hs_request req = {
      .call = id->step == 0 ? MX_HS_WHOAMI : MX_HS_JOINED_ROOMS,
      .token = id->token,
  };
  if (hub->api.start(hub->api.impl, &req, identity_done, id, &id->handle)) {
    id->handle = NULL;
    identity_failed(id);
  }
}

/* Attaches st to its token's identity, creating (and resolving) it if it
 * is new. Returns false when memory is short. */
static bool identity_attach(mx_sync_stream *st) {
  mx_sync_hub *hub = st->hub;
  identity *id = mx_strmap_get(&hub->identities, st->token,
                               strlen(st->token));
  bool created = false;
  if (!id) {
    id = calloc(1, sizeof(*id));
    if (!id || !(id->token = strdup(st->token)) ||
        mx_strmap_put(&hub->identities, id->token, strlen(id->token), id,
                      NULL)) {
      if (id)
        free(id->token);
      free(id);
      return false;
    }
    id->hub = hub;
    mx_list_init(&id->streams);
    created = true;
  }
  st->id = id;
  mx_list_push_back(&id->streams, &st->inode);
  if (created)
    identity_step(id);
  else if (id->step == 2)
    identity_user_link(st);
  return true;
}

bool identity_ready(mx_sync_stream *st) {
  if (!st->id && !identity_attach(st))
    return true; /* no memory: do without */
  identity *id = st->id;
  if (!id || id->step < 2)
    return false;
  if (id->error_status) {
    if (hub_is_json_object(id->error_body, id->error_len))
      hub_answer_error(st, id->error_status, id->error_body, id->error_len);
    else
      hub_answer_own_error(st, id->error_status, "M_UNKNOWN",
                           "The homeserver refused the access token");
    return false;
  }
  return true;
}

void *mx_sync_hub_get_as(mx_sync_hub *hub, const char *user, size_t len,
                         const mx_hs_request *req, mx_hs_done_fn done,
                         void *ud) {
  user_entry *u = mx_strmap_get(&hub->users, user, len);
  mx_list_node *n = u ? mx_list_first(&u->streams) : NULL;
  if (!n)
    return NULL;
  mx_sync_stream *st = MX_CONTAINER_OF(n, mx_sync_stream, unode);
  mx_hs_request r = *req;
  r.token = st->token;
  r.peer_ip = st->peer_ip;
  r.user_agent = st->user_agent;
  void *handle = NULL;
  if (hub->api.start(hub->api.impl, &r, done, ud, &handle))
    return NULL;
  return handle;
}

void mx_sync_hub_get_cancel(mx_sync_hub *hub, void *handle) {
  if (handle)
    hub->api.cancel(hub->api.impl, handle);
}

void mx_sync_hub_set_presence(mx_sync_hub *hub,
                              const mx_sync_presence_ops *ops) {
  hub->presence_ops = ops ? *ops : (mx_sync_presence_ops){0};
}
