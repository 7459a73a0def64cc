/* The reverse proxy to the homeserver. */
#ifndef MX_PROXY_H
#define MX_PROXY_H

#include "h2/exchange.h"
#include "h2/server.h"

/* Forwards the request to the homeserver and streams the answer back.
 * Takes over the exchange (installs its handler). */
void mx_proxy_handle(mx_server *s, mx_exchange *ex);

#endif
