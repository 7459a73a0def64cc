#include "common/error.h"

const char *mx_strerror(int err) {
  switch (err) {
  case MX_OK: return "success";
  case MX_ERR_NOMEM: return "out of memory";
  case MX_ERR_LIMIT: return "limit exceeded";
  case MX_ERR_INVALID: return "invalid input";
  case MX_ERR_IO: return "I/O error";
  case MX_ERR_AGAIN: return "try again";
  case MX_ERR_CLOSED: return "closed";
  case MX_ERR_TLS: return "TLS error";
  case MX_ERR_PROTO: return "protocol error";
  case MX_ERR_UPSTREAM: return "upstream error";
  case MX_ERR_TIMEOUT: return "timed out";
  case MX_ERR_NOTFOUND: return "not found";
  case MX_ERR_UNAVAILABLE: return "unavailable";
  default: return "unknown error";
  }
}
