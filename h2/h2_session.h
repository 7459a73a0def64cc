/* HTTP/2 on a client connection, through nghttp2's server session. */
#ifndef MX_H2_SESSION_H
#define MX_H2_SESSION_H

#include "common/error.h"
#include "h2/conn.h"

/* Installs the HTTP/2 protocol on c (after ALPN h2 or the h2c preface):
 * sends our SETTINGS. Returns 0 or MX_ERR_NOMEM. */
int mx_h2_session_start(mx_conn *c) MX_MUST_CHECK;

#endif
