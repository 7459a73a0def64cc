#include "common/service.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "common/log.h"

static struct {
  struct ev_loop *loop;
  ev_timer watchdog;
  bool started;   /* listeners bound */
  bool wait_feed; /* READY also waits for the feed */
  bool feed_up;
  bool ready;     /* READY=1 sent */
  bool stopping;
} svc;

static void notify(const char *state) {
  int rv = sd_notify(0, state);
  if (rv < 0)
    MX_LOG_WARN("service.notify_failed", "error=%d", -rv);
}

static void maybe_ready(void) {
  if (svc.ready || svc.stopping || !svc.started ||
      (svc.wait_feed && !svc.feed_up))
    return;
  svc.ready = true;
  notify("READY=1\nSTATUS=serving");
}

static void watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents) {
  notify("WATCHDOG=1");
}

void mx_service_start(struct ev_loop *loop, bool wait_feed) {
  svc.loop = loop;
  svc.started = true;
  svc.wait_feed = wait_feed;
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
    double every = (double)usec / 2e6;
    ev_timer_init(&svc.watchdog, watchdog_cb, every, every);
    ev_timer_start(loop, &svc.watchdog);
    ev_unref(loop); /* the pings never keep the loop alive */
    notify("WATCHDOG=1");
    MX_LOG_INFO("service.watchdog", "interval_ms=%.0f", every * 1000);
  }
  if (wait_feed && !svc.feed_up)
    notify("STATUS=listening; waiting for the replication feed");
  maybe_ready();
}

void mx_service_feed_up(void) {
  svc.feed_up = true;
  maybe_ready();
}

void mx_service_reloading(void) {
  if (!svc.ready || svc.stopping)
    return;
  /* systemd >= 253 (Type=notify-reload) wants the time of the request;
   * older managers ignore the field. */
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  char msg[96];
  snprintf(msg, sizeof(msg),
           "RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC=%" PRIu64,
           (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u);
  notify(msg);
}

void mx_service_reloaded(void) {
  if (!svc.ready || svc.stopping)
    return;
  notify("READY=1\nSTATUS=serving");
}

void mx_service_stopping(void) {
  if (svc.stopping)
    return;
  svc.stopping = true;
  notify("STOPPING=1\nSTATUS=draining connections");
}
