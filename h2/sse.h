/* The MSC2108 sync stream endpoint (GET .../sync/sse). */
#ifndef MX_SSE_H
#define MX_SSE_H

#include <stdbool.h>

#include "h2/exchange.h"
#include "h2/server.h"

/* Serves the request when it is for the SSE sync endpoint; returns false
 * (touching nothing) otherwise. */
bool mx_sse_route(mx_server *s, mx_exchange *ex);

#endif
