/*
 * The homeserver's client API, the one place that knows its URLs: an
 * mx_hs_api (sync/homeserver_api.h) whose calls -- /sync, account/whoami,
 * joined_rooms, rooms/{id}/joined_members -- go through the pooled
 * upstream client with the client's token as a Bearer header (never in
 * the URL), its address in X-Forwarded-For and its User-Agent, and come
 * back as whole bodies.
 */
#ifndef MX_CLIENT_API_H
#define MX_CLIENT_API_H

#include "homeserver/upstream.h"
#include "sync/homeserver_api.h"

/* Fills api with calls made through u (borrowed; it must outlive every
 * user of api). */
void mx_client_api_init(mx_hs_api *api, mx_upstream *u);

#endif
