/*
 * What fuzz_h1_session and fuzz_h2_session share: one client connection
 * without a socket (tests/unit/front_fake.h) running the real protocol
 * code, routed to the real handlers: the SSE endpoint on a sync hub whose
 * homeserver answers at once (tests/unit/hub_fake.h), the proxy on an
 * upstream client that never sends (its requests stay pending), the
 * admin pages, the errors.
 *
 * Input layout: a flags byte (bit 0: the admin listener, bit 1: a
 * connection over its limit, bit 2: feed the bytes at once instead of in
 * pieces), a byte that seeds the piece sizes, then the client's bytes.
 * Between pieces the protocol writes and the loop runs, so responses,
 * window updates and SSE events interleave with the input.
 */
#ifndef MX_TESTS_FUZZ_SESSION_H
#define MX_TESTS_FUZZ_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"

/* Runs one input on a new connection speaking proto (MX_PROTO_H1 or
 * MX_PROTO_H2), prefix (may be NULL) sent before the input. Aborts when
 * the connection's exchanges do not all end, and otherwise calls
 * check_wire with everything the server sent. */
void fz_session_run(int proto, const char *prefix, const uint8_t *data,
                    size_t size,
                    void (*check_wire)(const mx_buf *wire,
                                       const uint8_t *payload, size_t n));

#endif
