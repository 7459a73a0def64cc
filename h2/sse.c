#include "h2/sse.h"

/* The SSE sync endpoint is not served yet: its paths go upstream. */
bool mx_sse_route(mx_server *s, mx_exchange *ex) { return false; }
