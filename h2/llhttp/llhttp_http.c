/* Compiles llhttp's http.c from the system copy (Debian node-llhttp). */
#include "http.c"
