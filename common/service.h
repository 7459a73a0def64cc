/*
 * The service manager: readiness, reload, stop and watchdog notifications
 * to systemd (sd_notify(3)) for a Type=notify unit. The one module that
 * knows libsystemd; every call is a no-op when NOTIFY_SOCKET is not set
 * (not started by systemd), so the rest of the program calls them
 * unconditionally.
 *
 * READY=1 is sent once, when the listeners are bound (mx_service_start)
 * and, if the caller asked to wait for it, the replication feed is up
 * (mx_service_feed_up), in whichever order they come.
 */
#ifndef MX_SERVICE_H
#define MX_SERVICE_H

#include <ev.h>
#include <stdbool.h>

/* Called once the listeners are bound, before the loop runs. wait_feed:
 * READY waits for mx_service_feed_up(). Starts the watchdog pings when the
 * unit sets WatchdogSec (WATCHDOG_USEC): every half interval, from loop,
 * so a stuck loop stops them. */
void mx_service_start(struct ev_loop *loop, bool wait_feed);

/* The replication feed is connected (each time; only the first counts). */
void mx_service_feed_up(void);

/* Around a configuration reload (SIGHUP): RELOADING=1 with
 * MONOTONIC_USEC, then READY=1 again. Nothing before the first READY. */
void mx_service_reloading(void);
void mx_service_reloaded(void);

/* Graceful shutdown has begun (SIGTERM): STOPPING=1. */
void mx_service_stopping(void);

#endif
