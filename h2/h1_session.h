/* HTTP/1.1 on a client connection, parsed by llhttp. */
#ifndef MX_H1_SESSION_H
#define MX_H1_SESSION_H

#include "common/error.h"
#include "h2/conn.h"

/* Installs the HTTP/1.1 protocol on c. Returns 0 or MX_ERR_NOMEM. */
int mx_h1_session_start(mx_conn *c) MX_MUST_CHECK;

#endif
