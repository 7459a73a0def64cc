#include "h2/tls.h"

#include <openssl/err.h>
#include <string.h>

static int select_alpn(SSL *ssl, const unsigned char **out,
                       unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
  static const unsigned char prefs[] = "\x02h2\x08http/1.1";
  unsigned char *sel;
  if (SSL_select_next_proto(&sel, outlen, prefs, sizeof(prefs) - 1, in,
                            inlen) == OPENSSL_NPN_NEGOTIATED) {
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
  }
  /* Nothing we speak was offered: carry on without ALPN (HTTP/1.1). */
  return SSL_TLSEXT_ERR_NOACK;
}

static void openssl_error(char *err, size_t errlen, const char *what,
                          const char *file) {
  char detail[256] = "";
  unsigned long e = ERR_get_error();
  if (e)
    ERR_error_string_n(e, detail, sizeof(detail));
  ERR_clear_error();
  snprintf(err, errlen, "%s %s: %s", what, file ? file : "", detail);
}

SSL_CTX *mx_tls_ctx_new(const char *cert, const char *key, SSL_CTX *previous,
                        char *err, size_t errlen) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (!ctx) {
    openssl_error(err, errlen, "cannot create TLS context", NULL);
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  /* HTTP/2 forbids the TLS 1.2 suites without forward secrecy or AEAD
   * (RFC 9113 9.2.2); offer only those. */
  SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20");
  /* Clients often close without close_notify; HTTP framing tells us
   * whether a message was complete, so an unexpected EOF is a close. */
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION |
                               SSL_OP_NO_RENEGOTIATION |
                               SSL_OP_CIPHER_SERVER_PREFERENCE |
                               SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS |
                            SSL_MODE_ENABLE_PARTIAL_WRITE |
                            SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
  static const unsigned char sid_ctx[] = "mxsse";
  SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
  SSL_CTX_set_alpn_select_cb(ctx, select_alpn, NULL);
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    openssl_error(err, errlen, "cannot load certificate", cert);
    SSL_CTX_free(ctx);
    return NULL;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
    openssl_error(err, errlen, "cannot load key", key);
    SSL_CTX_free(ctx);
    return NULL;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    openssl_error(err, errlen, "key does not match certificate", key);
    SSL_CTX_free(ctx);
    return NULL;
  }
  if (previous) {
    unsigned char keys[80];
    long n = SSL_CTX_get_tlsext_ticket_keys(previous, keys, sizeof(keys));
    if (n > 0)
      SSL_CTX_set_tlsext_ticket_keys(ctx, keys, sizeof(keys));
    OPENSSL_cleanse(keys, sizeof(keys));
  }
  return ctx;
}
