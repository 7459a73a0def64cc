/*
 * Capped exponential backoff with jitter, for every retry loop that talks
 * to a peer (the homeserver, Redis): base * 2^attempt, capped at max, then
 * multiplied by a factor in [0.5, 1.5) so that many clients of one
 * restarted server do not come back at the same instant, and capped again.
 */
#ifndef MX_BACKOFF_H
#define MX_BACKOFF_H

/* The delay (seconds) before retry number attempt (0 for the first).
 * Uses random(): seed it with srandom() once. */
double mx_backoff_delay(double base, double max, int attempt);

#endif
