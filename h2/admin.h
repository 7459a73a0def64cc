/* The admin listener: /healthz, /readyz and Prometheus /metrics. */
#ifndef MX_ADMIN_H
#define MX_ADMIN_H

#include "h2/exchange.h"
#include "h2/server.h"

/* Answers a request that arrived on the admin listener. */
void mx_admin_handle(mx_server *s, mx_exchange *ex);

#endif
