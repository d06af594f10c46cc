/*
 * Page-cache invalidation for aliased files, on a thread of its own.
 *
 * Why a thread: FUSE_NOTIFY_INVAL_INODE makes the kernel lock each cached
 * page of the range; a page is locked while a read of it waits for our
 * answer. Sent from the event loop, the notification could wait for a read
 * only the event loop can answer: a deadlock. Sent from this thread, it
 * waits at most until that read is answered.
 *
 * Why after the reply and not before it: a write's reply waiting for the
 * invalidation of another file could wait for that file's own write, whose
 * reply waits for ours (two aliases written at once). So coherence is
 * "shortly after": a reader opening the other file after the write
 * returned sees the new bytes anyway (aliased files drop their page cache
 * at open: no keep_cache), one that has it open sees them once this thread
 * has sent the notification (normally at once).
 *
 * Bounded: one pending range per inode (a new one is merged into it), so
 * the queue never grows; the thread holds its own dup of the session fd,
 * so closing the session never races with a write here, and it frees the
 * queue when it ends (or the session does, whichever is last).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "inval.h"

struct range {
  double lo, hi; /* bytes; lo >= hi: nothing queued */
};

struct qf_inval {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int fd;
  int nnodes;
  struct range *pending; /* index = ino - 1 */
  int npending;          /* inodes with a range queued */
  int next;              /* where the scan for queued ranges goes on (round robin) */
  int stop;
  int refs; /* the session and the thread */
  double sent, failed;
};

static void unref(struct qf_inval *q) {
  pthread_mutex_lock(&q->mu);
  int last = --q->refs == 0;
  pthread_mutex_unlock(&q->mu);
  if (!last) return;
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  free(q->pending);
  free(q);
}

static int notify(int fd, uint64_t ino, double lo, double hi) {
  struct fuse_out_header out;
  struct fuse_notify_inval_inode_out arg;
  memset(&out, 0, sizeof(out));
  memset(&arg, 0, sizeof(arg));
  out.len = sizeof(out) + sizeof(arg);
  out.error = FUSE_NOTIFY_INVAL_INODE;
  out.unique = 0;
  arg.ino = ino;
  arg.off = (int64_t)lo;
  arg.len = (int64_t)(hi - lo);
  struct iovec iov[2] = {{&out, sizeof(out)}, {&arg, sizeof(arg)}};
  ssize_t n;
  do n = writev(fd, iov, 2);
  while (n < 0 && errno == EINTR);
  return n == (ssize_t)out.len ? 0 : -1;
}

static void *run(void *arg) {
  struct qf_inval *q = arg;
  pthread_mutex_lock(&q->mu);
  for (;;) {
    while (!q->stop && q->npending == 0) pthread_cond_wait(&q->cv, &q->mu);
    if (q->stop) break;
    int i = q->next;
    while (q->pending[i].lo >= q->pending[i].hi) i = (i + 1) % q->nnodes;
    struct range r = q->pending[i];
    q->pending[i].lo = q->pending[i].hi = 0;
    q->npending--;
    q->next = (i + 1) % q->nnodes;
    pthread_mutex_unlock(&q->mu);
    int rc = notify(q->fd, (uint64_t)i + 1, r.lo, r.hi);
    pthread_mutex_lock(&q->mu);
    if (rc == 0) q->sent++;
    else q->failed++; /* ENOENT: nothing cached for it; ENODEV: unmounted */
  }
  pthread_mutex_unlock(&q->mu);
  close(q->fd);
  unref(q);
  return NULL;
}

struct qf_inval *qf_inval_new(int fuse_fd, int nnodes) {
  struct qf_inval *q = calloc(1, sizeof(*q));
  if (!q) return NULL;
  q->pending = calloc((size_t)nnodes, sizeof(*q->pending));
  q->fd = fcntl(fuse_fd, F_DUPFD_CLOEXEC, 0); /* not inherited by the children qmount runs (fusermount) */
  if (!q->pending || q->fd < 0) goto fail;
  q->nnodes = nnodes;
  q->refs = 2;
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->cv, NULL);
  /* Signals stay with Node's threads. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t at;
  pthread_attr_init(&at);
  pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
  pthread_t th;
  int rc = pthread_create(&th, &at, run, q);
  pthread_attr_destroy(&at);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    goto fail;
  }
  return q;
fail:
  if (q->fd >= 0) close(q->fd);
  free(q->pending);
  free(q);
  return NULL;
}

int qf_inval_queue(struct qf_inval *q, uint64_t ino, double off, double len) {
  if (ino < 1 || ino > (uint64_t)q->nnodes || !(off >= 0) || !(len > 0)) return -1;
  pthread_mutex_lock(&q->mu);
  struct range *r = &q->pending[ino - 1];
  if (r->lo >= r->hi) {
    r->lo = off;
    r->hi = off + len;
    q->npending++;
    pthread_cond_signal(&q->cv);
  } else {
    if (off < r->lo) r->lo = off;
    if (off + len > r->hi) r->hi = off + len;
  }
  pthread_mutex_unlock(&q->mu);
  return 0;
}

void qf_inval_counts(struct qf_inval *q, double *sent, double *failed) {
  pthread_mutex_lock(&q->mu);
  *sent = q->sent;
  *failed = q->failed;
  pthread_mutex_unlock(&q->mu);
}

void qf_inval_stop(struct qf_inval *q) {
  pthread_mutex_lock(&q->mu);
  q->stop = 1;
  pthread_cond_signal(&q->cv);
  pthread_mutex_unlock(&q->mu);
  unref(q);
}
