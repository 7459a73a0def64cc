/*
 * A tiny TAP producer for unit tests: each test is a function; the runner
 * prints "ok N - name" or "not ok N - name" with the failed checks as TAP
 * diagnostics, then the plan. Automake's tap-driver turns that into a
 * per-test result and a total.
 *
 *   static void test_append(void) { CHECK(x == 1); CHECK_STREQ(a, b); }
 *   int main(void) { TAP_RUN(test_append, test_other); }
 */
#ifndef MX_TAP_H
#define MX_TAP_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Tests call functions for their effects and CHECK the results that
 * matter; the daemon's own code may ignore none (MX_MUST_CHECK). */
#pragma GCC diagnostic ignored "-Wunused-result"

static int tap_failed_checks;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      printf("# %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);      \
      tap_failed_checks++;                                                   \
    }                                                                        \
  } while (0)

#define CHECK_INT(a, b)                                                      \
  do {                                                                       \
    long long tap_a_ = (long long)(a), tap_b_ = (long long)(b);              \
    if (tap_a_ != tap_b_) {                                                  \
      printf("# %s:%d: %s == %s: %lld != %lld\n", __FILE__, __LINE__, #a,    \
             #b, tap_a_, tap_b_);                                            \
      tap_failed_checks++;                                                   \
    }                                                                        \
  } while (0)

#define CHECK_STREQ(a, b)                                                    \
  do {                                                                       \
    const char *tap_a_ = (a), *tap_b_ = (b);                                 \
    if (!tap_a_ || !tap_b_ || strcmp(tap_a_, tap_b_) != 0) {                 \
      printf("# %s:%d: %s == %s: \"%s\" != \"%s\"\n", __FILE__, __LINE__,    \
             #a, #b, tap_a_ ? tap_a_ : "(null)", tap_b_ ? tap_b_ : "(null)"); \
      tap_failed_checks++;                                                   \
    }                                                                        \
  } while (0)

#define CHECK_MEMEQ(a, alen, b, blen)                                        \
  do {                                                                       \
    size_t tap_al_ = (alen), tap_bl_ = (blen);                               \
    if (tap_al_ != tap_bl_ || memcmp((a), (b), tap_al_) != 0) {              \
      printf("# %s:%d: %s (%zu bytes) != %s (%zu bytes)\n", __FILE__,        \
             __LINE__, #a, tap_al_, #b, tap_bl_);                            \
      tap_failed_checks++;                                                   \
    }                                                                        \
  } while (0)

typedef struct tap_case {
  const char *name;
  void (*fn)(void);
} tap_case;

static inline int tap_run(const tap_case *cases, size_t n) {
  int failures = 0;
  printf("1..%zu\n", n);
  for (size_t i = 0; i < n; i++) {
    tap_failed_checks = 0;
    cases[i].fn();
    if (tap_failed_checks)
      failures++;
    printf("%sok %zu - %s\n", tap_failed_checks ? "not " : "", i + 1,
           cases[i].name);
    fflush(stdout);
  }
  return failures ? 1 : 0;
}

#define TAP_CASE(fn) {#fn, fn}
#define TAP_RUN(...)                                                         \
  do {                                                                       \
    static const tap_case tap_cases_[] = {__VA_ARGS__};                      \
    return tap_run(tap_cases_, sizeof(tap_cases_) / sizeof(tap_cases_[0]));  \
  } while (0)

#endif
