/*
 * The homeserver side of the sync hub: an mx_sync_fetcher that issues
 * GET /_matrix/client/v3/sync through the pooled upstream client, with
 * the client's token as a Bearer header (never in the URL), its address
 * in X-Forwarded-For and its User-Agent, and hands back whole bodies.
 */
#ifndef MX_SYNC_UPSTREAM_H
#define MX_SYNC_UPSTREAM_H

#include "common/upstream.h"
#include "sync/hub.h"

/* Fills f with a fetcher using u (borrowed; must outlive the hub). */
void mx_sync_upstream_fetcher(mx_upstream *u, mx_sync_fetcher *f);

#endif
