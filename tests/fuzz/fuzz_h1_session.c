/* HTTP/1.1 from a client, through the front's read path (h2/h1_session.c
 * on llhttp) and on to the router and handlers, on a connection without
 * a socket: see session.h for the set-up and the input layout.
 *
 * Properties: no crash, no leak, every exchange ends when the connection
 * goes; and what the server sent parses as a sequence of HTTP/1.1
 * responses (checked when no request could be a HEAD, whose responses
 * carry a length but no body). */
#include <llhttp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/metrics.h"
#include "tests/fuzz/fuzz.h"
#include "tests/fuzz/session.h"

static bool mentions_head(const uint8_t *p, size_t n) {
  for (size_t i = 0; i + 4 <= n; i++)
    if (!memcmp(p + i, "HEAD", 4))
      return true;
  return false;
}

static void check_wire(const mx_buf *wire, const uint8_t *payload, size_t n) {
  if (wire->len == 0 || mentions_head(payload, n))
    return;
  llhttp_settings_t settings;
  llhttp_settings_init(&settings);
  llhttp_t parser;
  llhttp_init(&parser, HTTP_RESPONSE, &settings);
  llhttp_errno_t err = llhttp_execute(&parser, wire->data, wire->len);
  if (err != HPE_OK)
    abort(); /* we sent something that is not HTTP/1.1 */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_session_run(MX_PROTO_H1, NULL, data, size, check_wire);
  return 0;
}
