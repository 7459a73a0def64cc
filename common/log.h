/*
 * Structured logging: one line per event on stderr,
 *   2026-11-24T08:00:00.123Z level=info event=conn.open peer=127.0.0.1:5555
 * Callers pass the event name and "key=value" pairs. Access tokens must
 * never reach a log line: log request targets through mx_log_redact_target().
 */
#ifndef MX_LOG_H
#define MX_LOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "common/error.h"

typedef enum {
  MX_LOG_ERROR = 0,
  MX_LOG_WARN = 1,
  MX_LOG_INFO = 2,
  MX_LOG_DEBUG = 3,
} mx_log_level;

/* Sets the threshold and the output (borrowed; NULL means stderr). */
void mx_log_init(mx_log_level level, FILE *out);

/* Changes the threshold only (a reload). */
void mx_log_set_level(mx_log_level level);

/* Parses "error|warn|info|debug". Returns 0 or MX_ERR_INVALID. */
int mx_log_level_parse(const char *name, mx_log_level *out);

bool mx_log_enabled(mx_log_level level);

void mx_log(mx_log_level level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define MX_LOG_ERR(event, ...) mx_log(MX_LOG_ERROR, event, __VA_ARGS__)
#define MX_LOG_WARN(event, ...) mx_log(MX_LOG_WARN, event, __VA_ARGS__)
#define MX_LOG_INFO(event, ...) mx_log(MX_LOG_INFO, event, __VA_ARGS__)
#define MX_LOG_DEBUG(event, ...)                                             \
  do {                                                                       \
    if (mx_log_enabled(MX_LOG_DEBUG))                                        \
      mx_log(MX_LOG_DEBUG, event, __VA_ARGS__);                              \
  } while (0)

/*
 * Copies a request target into out (size outlen, always NUL-terminated,
 * truncated if needed) with the value of every access_token query
 * parameter replaced by "<redacted>" and control characters, spaces and
 * quotes escaped as %XX, so the result is safe inside a log line.
 */
void mx_log_redact_target(const char *target, size_t len, char *out,
                          size_t outlen);

#endif
