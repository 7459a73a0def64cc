/* Compiles llhttp's llhttp.c from the system copy (Debian node-llhttp). */
#include "llhttp.c"
