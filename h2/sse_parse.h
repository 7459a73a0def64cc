/*
 * A streaming Server-Sent Events parser following the WHATWG HTML
 * "event stream interpretation" rules: lines end at CRLF, LF or a lone CR
 * (a CRLF split across two feeds is one break), one UTF-8 BOM at the
 * start of the stream is dropped, lines starting with ':' are comments,
 * the fields are data (appended, joined with LF), event, id (ignored when
 * it contains NUL) and retry (ASCII digits only), anything else is
 * ignored, and a blank line dispatches the event unless its data is
 * empty. An unterminated event at the end of the stream is never
 * dispatched.
 *
 * It works on bytes: UTF-8 decoding (and its U+FFFD replacement) is the
 * caller's business. Used by tests, benchmarks and the test clients; the
 * daemon only encodes (h2/sse_event.h).
 *
 * Every buffer is capped: a line (whatever way it is split across feeds)
 * longer than max_line, or event data longer than max_data, fails the
 * parse with MX_ERR_LIMIT. Memory stays below about 4 * max_line +
 * max_data.
 */
#ifndef MX_SSE_PARSE_H
#define MX_SSE_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"
#include "common/limits.h"

/* One dispatched event; every pointer is borrowed and valid only during
 * the callback. Strings are also NUL-terminated (data may contain NULs,
 * so use the lengths). */
typedef struct mx_sse_parse_event {
  const char *type; /* "message" when the event set no type */
  size_t typelen;
  const char *data; /* the data lines joined with LF */
  size_t datalen;
  const char *id; /* the last event ID at dispatch; "" when none */
  size_t idlen;
} mx_sse_parse_event;

/* Callbacks return 0 to go on; any other value stops the parser, which
 * then returns it from this and every later mx_sse_parse_feed. Only
 * on_event is required. */
typedef struct mx_sse_parse_cbs {
  int (*on_event)(void *ud, const mx_sse_parse_event *ev);
  /* A valid retry field; ms saturates at UINT64_MAX. */
  int (*on_retry)(void *ud, uint64_t ms);
  /* A comment line; text is what follows the ':' (": " heartbeats give
   * " "). Borrowed for the call. */
  int (*on_comment)(void *ud, const char *text, size_t len);
} mx_sse_parse_cbs;

typedef struct mx_sse_parser {
  mx_sse_parse_cbs cbs;
  void *ud;
  size_t max_line;
  mx_buf line;   /* unterminated line carried to the next feed */
  mx_buf data;   /* data buffer of the event being read */
  mx_buf type;   /* event type buffer */
  mx_buf idbuf;  /* last event ID buffer (set by id:) */
  mx_buf lastid; /* last event ID string (set at each blank line) */
  unsigned char bom; /* BOM bytes seen at the start; 3 once past it */
  bool cr;           /* the last byte fed was a CR */
  int err;           /* sticky: set by a failure or a stopping callback */
} mx_sse_parser;

/* Prepares p; cbs is copied, ud is passed to every callback. Nothing is
 * allocated until bytes arrive. */
void mx_sse_parse_init(mx_sse_parser *p, size_t max_line, size_t max_data,
                       const mx_sse_parse_cbs *cbs, void *ud);

/*
 * Parses len more bytes of the stream, calling back for each complete
 * event, retry and comment. Returns 0, MX_ERR_LIMIT (a cap was hit),
 * MX_ERR_NOMEM, or a callback's non-zero value. Errors are sticky.
 */
int mx_sse_parse_feed(mx_sse_parser *p, const char *buf, size_t len) MX_MUST_CHECK;

/* The last event ID string a reconnect should send (Last-Event-ID):
 * the id in force at the last blank line. Borrowed until the next feed. */
const char *mx_sse_parse_last_id(const mx_sse_parser *p, size_t *len);

/* Frees the buffers; p can be initialised again. */
void mx_sse_parse_free(mx_sse_parser *p);

#endif
