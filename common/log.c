#include "common/log.h"

#include <stdarg.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/error.h"

static mx_log_level threshold = MX_LOG_INFO;
static FILE *sink;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void mx_log_init(mx_log_level level, FILE *out) {
  threshold = level;
  sink = out;
}

void mx_log_set_level(mx_log_level level) { threshold = level; }

int mx_log_level_parse(const char *name, mx_log_level *out) {
  for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
    if (strcasecmp(name, level_names[i]) == 0) {
      *out = (mx_log_level)i;
      return 0;
    }
  }
  if (strcasecmp(name, "warning") == 0) {
    *out = MX_LOG_WARN;
    return 0;
  }
  return MX_ERR_INVALID;
}

bool mx_log_enabled(mx_log_level level) { return level <= threshold; }

void mx_log(mx_log_level level, const char *event, const char *fmt, ...) {
  if (!mx_log_enabled(level))
    return;
  FILE *out = sink ? sink : stderr;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char line[2048];
  int n = snprintf(line, sizeof(line),
                   "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s event=%s",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                   tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                   level_names[level], event);
  if (n < 0)
    return;
  size_t used = (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1;
  if (fmt && *fmt && used + 1 < sizeof(line)) {
    line[used++] = ' ';
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + used, sizeof(line) - used, fmt, ap);
    va_end(ap);
    if (m > 0)
      used += (size_t)m < sizeof(line) - used ? (size_t)m : sizeof(line) - used - 1;
  }
  /* One write per line keeps lines whole when several processes share
   * the stream. */
  line[used] = '\n';
  fwrite(line, 1, used + 1, out);
  fflush(out);
}

static bool needs_escape(unsigned char c) {
  return c <= 0x20 || c >= 0x7f || c == '"' || c == '\\';
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  c = (char)(c | 0x20);
  return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* True when the parameter name at p (up to '=' or a separator) means
 * access_token once percent-decoded, as the homeserver reads it. */
static bool names_access_token(const char *p, const char *end) {
  static const char want[] = "access_token";
  size_t w = 0;
  while (p < end && *p != '=' && *p != '&' && *p != ';') {
    char c = *p++;
    if (c == '%' && end - p >= 2 && hexval(p[0]) >= 0 && hexval(p[1]) >= 0) {
      c = (char)(hexval(p[0]) * 16 + hexval(p[1]));
      p += 2;
    } else if (c == '+') {
      c = ' ';
    }
    if (c >= 'A' && c <= 'Z')
      c = (char)(c + 32);
    if (w >= sizeof(want) - 1 || c != want[w])
      return false;
    w++;
  }
  return w == sizeof(want) - 1;
}

void mx_log_redact_target(const char *target, size_t len, char *out,
                          size_t outlen) {
  static const char hex[] = "0123456789ABCDEF";
  static const char repl[] = "access_token=<redacted>";
  size_t o = 0;
  if (outlen == 0)
    return;
  const char *end = target + len;
  const char *query = memchr(target, '?', len);
  for (size_t i = 0; i < len && o + 1 < outlen;) {
    /* A parameter starts after '?', '&' or ';' (the homeserver splits
     * on both separators). */
    if (query && target + i > query &&
        (target[i - 1] == '?' || target[i - 1] == '&' ||
         target[i - 1] == ';') &&
        names_access_token(target + i, end)) {
      if (o + sizeof(repl) - 1 >= outlen)
        break;
      memcpy(out + o, repl, sizeof(repl) - 1);
      o += sizeof(repl) - 1;
      while (i < len && target[i] != '&' && target[i] != ';')
        i++;
      continue;
    }
    unsigned char c = (unsigned char)target[i++];
    if (needs_escape(c)) {
      if (o + 3 >= outlen)
        break;
      out[o++] = '%';
      out[o++] = hex[c >> 4];
      out[o++] = hex[c & 15];
    } else {
      out[o++] = (char)c;
    }
  }
  out[o] = '\0';
}
