/*
 * Error codes shared by every module. Functions return 0 (or a positive
 * count) on success and one of these negative values on failure.
 */
#ifndef MX_ERROR_H
#define MX_ERROR_H

enum {
  MX_OK = 0,
  MX_ERR_NOMEM = -1,      /* allocation failed */
  MX_ERR_LIMIT = -2,      /* a configured cap would be exceeded */
  MX_ERR_INVALID = -3,    /* malformed input (peer or configuration) */
  MX_ERR_IO = -4,         /* socket or file error; errno is meaningful */
  MX_ERR_AGAIN = -5,      /* would block; retry when ready */
  MX_ERR_CLOSED = -6,     /* the peer or the object is gone */
  MX_ERR_TLS = -7,        /* TLS failure */
  MX_ERR_PROTO = -8,      /* protocol violation by a peer */
  MX_ERR_UPSTREAM = -9,   /* the homeserver failed or is unreachable */
  MX_ERR_TIMEOUT = -10,   /* a deadline passed */
  MX_ERR_NOTFOUND = -11,  /* no such object */
  MX_ERR_UNAVAILABLE = -12, /* a store or service could not be asked */
};

/* On functions whose result says whether something happened: ignoring it
 * is a compile error under -Werror. */
#define MX_MUST_CHECK __attribute__((warn_unused_result))

/* Returns a static description of an MX_ERR_* code. */
const char *mx_strerror(int err);

#endif
