/* The libFuzzer entry point every fuzz target defines. */
#ifndef MX_FUZZ_H
#define MX_FUZZ_H

#include <stddef.h>
#include <stdint.h>

/* Tests call functions for their effects and CHECK the results that
 * matter; the daemon's own code may ignore none (MX_MUST_CHECK). */
#pragma GCC diagnostic ignored "-Wunused-result"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
