/* TLS contexts for the client-facing listeners (OpenSSL 3). */
#ifndef MX_TLS_H
#define MX_TLS_H

#include <openssl/ssl.h>
#include <stddef.h>

/*
 * Builds a server context from PEM files: TLS >= 1.2 with forward-secret
 * AEAD suites, ALPN h2 then http/1.1 (a client offering neither, or no
 * ALPN at all, gets HTTP/1.1), session tickets and a server session cache,
 * SSL_MODE_RELEASE_BUFFERS. When `previous` is given its ticket keys are
 * carried over so resumption survives a certificate reload. Returns the
 * context (caller owns it) or NULL with a message in err.
 */
SSL_CTX *mx_tls_ctx_new(const char *cert, const char *key,
                        SSL_CTX *previous, char *err, size_t errlen);

#endif
