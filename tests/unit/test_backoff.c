/* The one jittered backoff (common/backoff.c): doubling from base, the cap
 * holding after the jitter, the jitter spreading in [0.5, 1.5). */
#include <stdlib.h>

#include "common/backoff.h"
#include "tests/unit/tap.h"

static void test_doubles_then_caps(void) {
  srandom(1);
  for (int attempt = 0; attempt < 12; attempt++) {
    double nominal = 0.5;
    for (int i = 0; i < attempt; i++)
      nominal *= 2;
    double lo = 1e9, hi = 0;
    for (int i = 0; i < 2000; i++) {
      double d = mx_backoff_delay(0.5, 30, attempt);
      lo = d < lo ? d : lo;
      hi = d > hi ? d : hi;
    }
    double cap = nominal < 30 ? nominal : 30;
    CHECK(lo >= cap * 0.5 - 1e-9);
    CHECK(hi < cap * 1.5 && hi <= 30);
  }
}

/* With base = max every delay is at most max, jitter included. */
static void test_cap_holds_after_jitter(void) {
  srandom(2);
  double worst = 0;
  for (int i = 0; i < 10000; i++) {
    double d = mx_backoff_delay(0.2, 0.2, i % 7);
    worst = d > worst ? d : worst;
  }
  CHECK(worst <= 0.2);
  CHECK(worst > 0.19); /* the jitter does reach the cap */
}

int main(void) {
  TAP_RUN(TAP_CASE(test_doubles_then_caps),
          TAP_CASE(test_cap_holds_after_jitter));
}
