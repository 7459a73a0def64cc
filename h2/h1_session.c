/*
 * HTTP/1.1 through llhttp. One request is served at a time: the parser is
 * paused after each request (pipelined bytes wait in `pending`) and while
 * a request body is ahead of its handler (the socket stops being read),
 * so memory per connection stays bounded whatever the client sends.
 *
 * Response bodies without a Content-Length are sent chunked, one HTTP
 * chunk per queued piece: an SSE event is one chunk, on the wire as soon
 * as the connection can take it.
 */
#include "h2/h1_session.h"

#include <llhttp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/error.h"
#include "common/limits.h"
#include "common/log.h"
#include "common/metrics.h"
#include "h2/exchange.h"
#include "h2/server.h"

typedef struct h1_exchange {
  mx_exchange ex; /* first */
  struct h1_session *sess;
  bool is_head;        /* HEAD request: never a body */
  bool no_body;        /* the response has no body on the wire */
  bool head_written;
  bool msg_complete;   /* the whole request was parsed */
  bool done;           /* response fully handed to the connection */
} h1_exchange;

typedef struct h1_session {
  mx_conn *conn;
  llhttp_t parser;
  h1_exchange *cur;
  /* request head being parsed */
  mx_buf url, field, value;
  bool in_value;
  size_t header_bytes, nheaders;
  bool reading_head;
  int error_status; /* set by callbacks to pick the error answer */
  const char *error_text;
  /* flow */
  mx_buf pending; /* received but not yet parsed (parser paused) */
  bool paused;
  bool keep_alive;
  bool close_when_done;
  bool shutdown;
  unsigned long requests; /* messages begun on this connection */
} h1_session;

static const mx_exchange_backend backend;
static llhttp_settings_t settings;

static h1_session *session_of(mx_conn *c) { return c->proto_data; }

static int fail(h1_session *s, int status, const char *text) {
  s->error_status = status;
  s->error_text = text;
  return HPE_USER;
}

/* --- parser callbacks ----------------------------------------------- */

static int on_message_begin(llhttp_t *p) {
  h1_session *s = p->data;
  h1_exchange *hx = calloc(1, sizeof(*hx));
  if (!hx)
    return fail(s, 503, "Out of memory");
  hx->sess = s;
  mx_exchange_init(&hx->ex, s->conn, &backend, hx);
  s->cur = hx;
  s->requests++;
  s->reading_head = true;
  mx_buf_reset(&s->url);
  mx_buf_reset(&s->field);
  mx_buf_reset(&s->value);
  s->in_value = false;
  s->header_bytes = s->nheaders = 0;
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  h1_session *s = p->data;
  if (mx_buf_append(&s->url, at, len))
    return fail(s, 414, "Request target too long");
  return 0;
}

static int commit_header(h1_session *s) {
  if (!s->in_value)
    return 0;
  s->in_value = false;
  if (++s->nheaders > MX_H1_MAX_HEADERS)
    return fail(s, 431, "Too many header fields");
  /* Leading/trailing whitespace of values is not part of them. */
  const char *v = s->value.data ? s->value.data : "";
  size_t vl = s->value.len;
  while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
    vl--;
  while (vl && (*v == ' ' || *v == '\t'))
    v++, vl--;
  if (mx_exchange_add_header(&s->cur->ex, s->field.data ? s->field.data : "",
                             s->field.len, v, vl))
    return fail(s, 431, "Request header fields too large");
  mx_buf_reset(&s->field);
  mx_buf_reset(&s->value);
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  h1_session *s = p->data;
  int rv = commit_header(s);
  if (rv)
    return rv;
  s->header_bytes += len;
  if (s->header_bytes > MX_H1_MAX_HEADER_BYTES ||
      mx_buf_append(&s->field, at, len))
    return fail(s, 431, "Request header fields too large");
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  h1_session *s = p->data;
  s->in_value = true;
  s->header_bytes += len;
  if (s->header_bytes > MX_H1_MAX_HEADER_BYTES ||
      mx_buf_append(&s->value, at, len))
    return fail(s, 431, "Request header fields too large");
  return 0;
}

static void queue_raw(h1_session *s, const char *data, size_t len) {
  /* Small protocol strings; a failed allocation surfaces as a truncated
   * response, which the client detects. */
  if (mx_chunkq_push_copy(&s->conn->out, data, len) != 0)
    s->close_when_done = true;
}

static int on_headers_complete(llhttp_t *p) {
  h1_session *s = p->data;
  int rv = commit_header(s);
  if (rv)
    return rv;
  h1_exchange *hx = s->cur;
  const char *method = llhttp_method_name((llhttp_method_t)p->method);
  if (mx_exchange_set_line(&hx->ex, method, strlen(method),
                           s->url.data ? s->url.data : "", s->url.len))
    return fail(s, 414, "Request target too long");
  hx->ex.req.http_minor = p->http_minor;
  hx->ex.req.has_body = (p->flags & F_CHUNKED) || p->content_length > 0;
  hx->is_head = p->method == HTTP_HEAD;
  mx_exchange_seal_head(&hx->ex);
  s->reading_head = false;
  s->keep_alive = llhttp_should_keep_alive(p) && !s->shutdown;
  if (p->method == HTTP_CONNECT)
    return fail(s, 405, "CONNECT is not supported");
  if (s->url.len == 0 || s->url.data[0] != '/') {
    /* Origin-form only; absolute-form is for proxies, "*" for OPTIONS. */
    if (!(p->method == HTTP_OPTIONS && s->url.len == 1 && s->url.data[0] == '*'))
      return fail(s, 400, "Request target must be a path");
  }
  const mx_header *expect = mx_exchange_header(&hx->ex, "expect");
  if (expect && p->http_minor >= 1 && expect->valuelen == 12 &&
      !strncasecmp(expect->value, "100-continue", 12))
    queue_raw(s, "HTTP/1.1 100 Continue\r\n\r\n", 25);
  mx_router_dispatch(s->conn->server, &hx->ex);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  h1_session *s = p->data;
  h1_exchange *hx = s->cur;
  if (hx->ex.closed || !hx->ex.handler || !hx->ex.handler->on_request_body)
    return 0; /* nobody reads it: discard */
  if (mx_exchange_push_body(&hx->ex, at, len))
    return fail(s, 503, "Out of memory");
  /* Stop parsing (and reading) until the handler catches up. */
  if (hx->ex.reqbody.bytes >= MX_REQBODY_HIGH)
    return HPE_PAUSED;
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  h1_session *s = p->data;
  h1_exchange *hx = s->cur;
  hx->msg_complete = true;
  if (!hx->ex.closed)
    mx_exchange_push_body_end(&hx->ex);
  /* One request at a time: the next waits until this one is answered. */
  return HPE_PAUSED;
}

/* --- running the parser --------------------------------------------- */

static void send_parse_error(h1_session *s, int status, const char *text) {
  h1_exchange *hx = s->cur;
  s->close_when_done = true;
  s->keep_alive = false;
  if (hx && !hx->ex.closed && !hx->ex.responded) {
    if (!hx->ex.req.method)
      mx_exchange_seal_head(&hx->ex);
    mx_exchange_error(&hx->ex, status,
                      status == 431 || status == 414 ? "M_TOO_LARGE"
                                                     : "M_UNRECOGNIZED",
                      text, NULL, 0);
    return;
  }
  if (!hx) {
    /* No exchange to answer through (garbage before a request). */
    mx_buf body;
    mx_buf_init(&body, 1024);
    if (mx_http_matrix_error(&body, "M_UNRECOGNIZED", text))
      mx_buf_reset(&body); /* no memory: an empty body still answers */
    char head[256];
    int n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                     "content-length: %zu\r\nconnection: close\r\n\r\n",
                     status, mx_http_reason(status), body.len);
    queue_raw(s, head, (size_t)n);
    queue_raw(s, body.data, body.len);
    mx_buf_free(&body);
  }
}

/* Feeds bytes to the parser. Returns 0 or MX_ERR_PROTO (answer queued,
 * connection closes after the flush). */
static int execute(h1_session *s, const char *data, size_t len) {
  llhttp_errno_t err = llhttp_execute(&s->parser, data, len);
  if (err == HPE_OK)
    return 0;
  if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
    /* Keep what the parser has not consumed for later. */
    const char *pos = llhttp_get_error_pos(&s->parser);
    size_t used = pos && pos >= data && pos <= data + len
                      ? (size_t)(pos - data) : len;
    s->paused = true;
    /* Paused for a request body its reader has not taken: stop reading.
     * Paused between requests: keep reading (bounded, into pending), so
     * a client that goes away is noticed at once, not at our next write
     * (an SSE stream would otherwise keep syncing for a departed client
     * until its next heartbeat). */
    if (s->cur && !s->cur->msg_complete)
      mx_conn_pause_read(s->conn, true);
    if (used < len && mx_buf_append(&s->pending, data + used, len - used)) {
      send_parse_error(s, 413, "Too much pipelined data");
      return MX_ERR_PROTO;
    }
    return 0;
  }
  /* Bytes that do not even start with a method, first thing on a
   * connection, are not HTTP/1.1 (h2c clients sending a broken preface,
   * stray protocols): answering them in HTTP/1.1 would only confuse. */
  if (err == HPE_INVALID_METHOD && s->requests <= 1) {
    MX_LOG_DEBUG("h1.not_http", "peer=%s", s->conn->peer_ip);
    s->close_when_done = true;
    return MX_ERR_PROTO;
  }
  int status = s->error_status ? s->error_status : 400;
  const char *text = s->error_text ? s->error_text : llhttp_get_error_reason(&s->parser);
  MX_LOG_DEBUG("h1.parse_error", "peer=%s status=%d reason=\"%s\"",
               s->conn->peer_ip, status, llhttp_errno_name(err));
  send_parse_error(s, status, text ? text : "Malformed request");
  return MX_ERR_PROTO;
}

/* Continues parsing after a pause, if the reason for it has gone. */
static int resume(h1_session *s) {
  if (!s->paused || s->close_when_done)
    return 0;
  h1_exchange *hx = s->cur;
  if (hx && !hx->msg_complete && hx->ex.reqbody.bytes >= MX_REQBODY_LOW)
    return 0; /* body still ahead of its reader */
  if (hx && hx->msg_complete)
    return 0; /* waiting for the response */
  s->paused = false;
  llhttp_resume(&s->parser);
  mx_conn_pause_read(s->conn, false);
  if (s->pending.len == 0)
    return 0;
  /* Parse the saved bytes from a copy: execute may save new leftovers. */
  size_t n;
  char *saved = mx_buf_steal(&s->pending, &n);
  mx_buf_init(&s->pending, MX_H1_MAX_REQUEST_LINE + MX_H1_MAX_HEADER_BYTES +
                               MX_CONN_READ_CHUNK);
  int rv = execute(s, saved, n);
  free(saved);
  return rv;
}

/* --- exchange backend ----------------------------------------------- */

static void head_ready(mx_exchange *ex) {
  h1_exchange *hx = ex->backend_ctx;
  mx_conn_schedule_write(hx->sess->conn);
}

static void body_ready(mx_exchange *ex) {
  h1_exchange *hx = ex->backend_ctx;
  mx_conn_schedule_write(hx->sess->conn);
}

static void body_consumed(mx_exchange *ex, size_t n) {
  h1_exchange *hx = ex->backend_ctx;
  h1_session *s = hx->sess;
  if (s->paused && !hx->msg_complete &&
      ex->reqbody.bytes < MX_REQBODY_LOW && s->cur == hx) {
    if (resume(s) != 0)
      s->close_when_done = true;
    mx_conn_schedule_write(s->conn);
  }
}

static void reset(mx_exchange *ex) {
  h1_exchange *hx = ex->backend_ctx;
  /* HTTP/1.1 cannot abort one response: close, so the client sees a
   * truncated body rather than a complete-looking one. */
  mx_conn_close_after_flush(hx->sess->conn);
}

static const mx_exchange_backend backend = {
    .head_ready = head_ready,
    .body_ready = body_ready,
    .body_consumed = body_consumed,
    .reset = reset,
};

static int write_head(h1_session *s, h1_exchange *hx) {
  mx_exchange *ex = &hx->ex;
  mx_buf head;
  mx_buf_init(&head, 64 * 1024);
  int minor = ex->req.http_minor >= 1 ? 1 : 0;
  int rv = mx_buf_appendf(&head, "HTTP/1.%d %d %s\r\n", minor, ex->status,
                          mx_http_reason(ex->status));
  bool has_length = ex->resp_content_length >= 0;
  hx->no_body = hx->is_head || ex->status == 204 || ex->status == 304 ||
                ex->status < 200;
  for (size_t i = 0; rv == 0 && i < ex->resp_nheaders; i++) {
    const mx_header *h = &ex->resp_headers[i];
    rv = mx_buf_appendf(&head, "%.*s: %.*s\r\n", (int)h->namelen, h->name,
                        (int)h->valuelen, h->value);
  }
  if (!hx->no_body && !has_length && !ex->resp_end_with_head) {
    if (minor == 1) {
      ex->resp_chunked = true;
      if (rv == 0)
        rv = mx_buf_append(&head, "transfer-encoding: chunked\r\n", 28);
    } else {
      s->keep_alive = false; /* HTTP/1.0: the body ends at close */
    }
  } else if (!hx->no_body && !has_length && ex->resp_end_with_head) {
    if (rv == 0)
      rv = mx_buf_append(&head, "content-length: 0\r\n", 19);
  }
  /* A response sent before its request was fully read ends the
   * connection: the rest of that body cannot be told from the next
   * request. */
  if (!hx->msg_complete && ex->req.has_body)
    s->keep_alive = false;
  if (s->shutdown)
    s->keep_alive = false;
  if (rv == 0) {
    if (!s->keep_alive)
      rv = mx_buf_append(&head, "connection: close\r\n", 19);
    else if (minor == 0)
      rv = mx_buf_append(&head, "connection: keep-alive\r\n", 24);
  }
  if (rv == 0)
    rv = mx_buf_append(&head, "\r\n", 2);
  if (rv == 0) {
    size_t len;
    char *data = mx_buf_steal(&head, &len);
    mx_chunk *c = mx_chunk_new(data, len);
    free(data);
    rv = c ? mx_chunkq_push(&s->conn->out, c) : MX_ERR_NOMEM;
    mx_chunk_unref(c);
  }
  mx_buf_free(&head);
  mx_exchange_head_sent(ex);
  hx->head_written = true;
  return rv;
}

/* Moves response bytes of the current exchange to the connection. */
static int move_body(h1_session *s, h1_exchange *hx) {
  mx_exchange *ex = &hx->ex;
  mx_conn *c = s->conn;
  while (ex->respbody.bytes && c->out.bytes < MX_CONN_WRITE_HIGH) {
    if (hx->no_body) {
      mx_chunkq_clear(&ex->respbody);
      break;
    }
    if (ex->resp_chunked) {
      const char *p;
      size_t n = mx_chunkq_peek(&ex->respbody, &p);
      char size[24];
      int sl = snprintf(size, sizeof(size), "%zx\r\n", n);
      queue_raw(s, size, (size_t)sl);
      mx_chunkq_move_one(&c->out, &ex->respbody);
      queue_raw(s, "\r\n", 2);
    } else {
      mx_chunkq_move_one(&c->out, &ex->respbody);
    }
  }
  if (ex->resp_ended && ex->respbody.bytes == 0 && !hx->done) {
    if (ex->resp_chunked && !hx->no_body)
      queue_raw(s, "0\r\n\r\n", 5);
    hx->done = true;
  }
  return 0;
}

static void finish_current(h1_session *s) {
  h1_exchange *hx = s->cur;
  s->cur = NULL;
  if (!hx->msg_complete)
    s->close_when_done = true;
  if (!s->keep_alive)
    s->close_when_done = true;
  mx_exchange_finish(&hx->ex, 0);
  free(hx);
}

/* --- connection protocol -------------------------------------------- */

static int h1_on_read(mx_conn *c, const char *data, size_t len) {
  h1_session *s = session_of(c);
  if (s->close_when_done)
    return 0;
  if (s->paused) {
    if (mx_buf_append(&s->pending, data, len)) {
      send_parse_error(s, 413, "Too much pipelined data");
      return MX_ERR_PROTO;
    }
    /* Room for one more read at most: then stop until the parser runs. */
    if (s->pending.len + MX_CONN_READ_CHUNK > s->pending.max)
      mx_conn_pause_read(c, true);
    return 0;
  }
  return execute(s, data, len);
}

static int h1_on_write(mx_conn *c) {
  h1_session *s = session_of(c);
  while (s->cur && s->cur->ex.responded) {
    h1_exchange *hx = s->cur;
    if (!hx->head_written && write_head(s, hx))
      return MX_ERR_NOMEM;
    move_body(s, hx);
    mx_exchange_after_send(&hx->ex);
    if (!hx->done)
      break;
    finish_current(s);
    if (s->close_when_done)
      break;
    if (resume(s))
      break; /* a parse error answer is queued */
  }
  return 0;
}

static bool h1_want_close(mx_conn *c) {
  h1_session *s = session_of(c);
  return s->cur == NULL && (s->close_when_done || s->shutdown);
}

static size_t h1_active(mx_conn *c) { return session_of(c)->cur ? 1 : 0; }

static bool h1_reading_head(mx_conn *c) {
  h1_session *s = session_of(c);
  return s->reading_head || (s->cur == NULL && s->pending.len > 0);
}

static void h1_shutdown(mx_conn *c, bool final) {
  h1_session *s = session_of(c);
  s->shutdown = true;
  s->keep_alive = false;
  if (final && s->cur)
    mx_exchange_shutdown(&s->cur->ex);
}

static void h1_free(mx_conn *c) {
  h1_session *s = session_of(c);
  if (s->cur) {
    mx_exchange_finish(&s->cur->ex, MX_ERR_CLOSED);
    free(s->cur);
  }
  mx_buf_free(&s->url);
  mx_buf_free(&s->field);
  mx_buf_free(&s->value);
  mx_buf_free(&s->pending);
  free(s);
  c->proto_data = NULL;
}

static const mx_proto_ops h1_ops = {
    .on_read = h1_on_read,
    .on_write = h1_on_write,
    .want_close = h1_want_close,
    .active = h1_active,
    .reading_head = h1_reading_head,
    .shutdown = h1_shutdown,
    .free = h1_free,
};

int mx_h1_session_start(mx_conn *c) {
  static bool settings_ready;
  if (!settings_ready) {
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_url = on_url;
    settings.on_header_field = on_header_field;
    settings.on_header_value = on_header_value;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
    settings_ready = true;
  }
  h1_session *s = calloc(1, sizeof(*s));
  if (!s)
    return MX_ERR_NOMEM;
  s->conn = c;
  llhttp_init(&s->parser, HTTP_REQUEST, &settings);
  s->parser.data = s;
  mx_buf_init(&s->url, MX_H1_MAX_REQUEST_LINE);
  mx_buf_init(&s->field, MX_H1_MAX_HEADER_BYTES);
  mx_buf_init(&s->value, MX_H1_MAX_HEADER_BYTES);
  mx_buf_init(&s->pending, MX_H1_MAX_REQUEST_LINE + MX_H1_MAX_HEADER_BYTES +
                               MX_CONN_READ_CHUNK);
  s->keep_alive = true;
  c->proto_data = s;
  c->ops = &h1_ops;
  return 0;
}
