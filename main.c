/*
 * mxsse: HTTP/2 Server-Sent-Events sync streams (MSC2108) in front of a
 * Matrix homeserver.
 */
#include <stdio.h>
#include <stdlib.h>

#include "common/config.h"
#include "common/log.h"

#define EXIT_USAGE 64

int main(int argc, char **argv) {
  mx_config cfg;
  mx_config_defaults(&cfg);
  int rv = mx_config_load(&cfg, argc, argv, stdout, stderr);
  if (rv != 0) {
    mx_config_free(&cfg);
    return rv > 0 ? EXIT_SUCCESS : EXIT_USAGE;
  }
  mx_log_level level = MX_LOG_INFO;
  if (cfg.log_level)
    mx_log_level_parse(cfg.log_level, &level);
  mx_log_init(level, NULL);
  mx_config_free(&cfg);
  return EXIT_SUCCESS;
}
