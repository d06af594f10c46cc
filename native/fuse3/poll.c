/*
 * Adaptive polling of /dev/fuse for the receive loop (session.c); the
 * rules are stated above struct qf_poll in qfuse.h.
 */
#include <stdlib.h>

#include "qfuse.h"

uint64_t qf_mono_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void qf_poll_init(struct qf_poll *p) {
  const char *us = getenv("QMOUNT_FUSE_POLL_US");
  long v = us != NULL && *us != 0 ? strtol(us, NULL, 10) : QF_POLL_DEFAULT_US;
  p->max_ns = v > 0 && v <= 10000 ? (uint64_t)v * 1000 : 0;
}

/* Woken from epoll: adapt the window to how long the loop slept. */
void qf_poll_adapt(struct qf_session *s) {
  struct qf_poll *p = &s->poll_state;
  if (p->slept_at == 0 || p->max_ns == 0) return;
  uint64_t slept = qf_mono_ns() - p->slept_at;
  p->slept_at = 0;
  if (slept > p->max_ns) p->ns = 0;
  else if (p->ns < slept) p->ns = p->ns == 0 ? QF_POLL_START_NS : (p->ns * 2 > p->max_ns ? p->max_ns : p->ns * 2);
}

/*
 * The receive loop found no request (EAGAIN): 1 to read again (after a
 * pause of QF_POLL_GAP_NS), 0 to return to the event loop (the time of
 * that is noted for qf_poll_adapt). `started`: when this receive loop
 * began (its time budget); `*poll_until`: the end of the current window,
 * 0 before it opened.
 */
int qf_poll_again(struct qf_session *s, uint64_t started, uint64_t *poll_until) {
  struct qf_poll *p = &s->poll_state;
  /* Poll only while every request was answered: one waiting for JS needs the event loop. */
  if (s->npending == 0 && p->ns > 0 && p->direct) {
    uint64_t now = qf_mono_ns();
    if (now - started > QF_RECEIVE_BUDGET_NS) {
      p->slept_at = now;
      return 0;
    }
    if (*poll_until == 0) *poll_until = now + p->ns;
    if (now < *poll_until) {
      uint64_t resume = now + QF_POLL_GAP_NS;
      while (qf_mono_ns() < resume) QF_CPU_RELAX();
      return 1;
    }
    s->st.poll_misses++;
  }
  p->slept_at = qf_mono_ns();
  return 0;
}
