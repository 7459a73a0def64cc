/* Compiles llhttp's api.c from the system copy (Debian node-llhttp). */
#include "api.c"
