/* HTTP/2 from a client, through nghttp2_session_mem_recv in the front's
 * session (h2/h2_session.c) and on to the router and handlers, on a
 * connection without a socket: see session.h for the set-up and the
 * input layout. The client connection preface is sent first; the input
 * is what follows it (frames).
 *
 * Properties: no crash, no leak, every stream's exchange ends when the
 * connection goes; and what the server sent is a whole number of frames,
 * none larger than the default maximum frame size, the first one our
 * SETTINGS. */
#include <stdlib.h>
#include <string.h>

#include "common/metrics.h"
#include "tests/fuzz/fuzz.h"
#include "tests/fuzz/session.h"

static void check_wire(const mx_buf *wire, const uint8_t *payload, size_t n) {
  const unsigned char *p = (const unsigned char *)wire->data;
  size_t len = wire->len, off = 0;
  if (len == 0)
    abort(); /* our SETTINGS go first, whatever the client sends */
  if (len < 9 || p[3] != 0x4 /* SETTINGS */)
    abort();
  while (off < len) {
    if (len - off < 9)
      abort(); /* a cut frame header */
    size_t flen = (size_t)p[off] << 16 | (size_t)p[off + 1] << 8 | p[off + 2];
    if (flen > 16384)
      abort();
    if (len - off - 9 < flen)
      abort(); /* a cut frame */
    off += 9 + flen;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_session_run(MX_PROTO_H2, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", data, size,
                 check_wire);
  return 0;
}
