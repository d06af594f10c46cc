/*
 * qmount's libfuse 3 low-level binding: shared declarations.
 *
 * One qf_session per mount. The session fd (/dev/fuse) is non-blocking and
 * watched by a uv_poll on Node's event loop: everything here runs on the JS
 * thread, so there are no locks. Requests are read straight from the fd into
 * a bounded pool of QF_BUF_SIZE buffers (not with fuse_session_receive_buf,
 * whose read size is libfuse's own bufsize: from libfuse 3.17 on it follows
 * /proc/sys/fs/fuse/max_pages_limit and could exceed our buffers) and handed
 * to fuse_session_process_buf. Metadata ops are answered in C (ops.c) from
 * attributes JS gave at mount (and keeps current: size and st_blocks, see
 * setFileAttrs in session.c); read, write, flush, fsync, lseek (SEEK_DATA/
 * SEEK_HOLE), fallocate and size changes go to JS with the index of the buffer holding the request, and the buffer
 * stays taken until JS replies (a read's data is written into that same
 * buffer, a write's data is a view into it: no copies).
 */
#ifndef QFUSE_H
#define QFUSE_H

#include <fuse_lowlevel.h>
#include <node_api.h>
#include <stdint.h>
#include <time.h>
#include <uv.h>

/** Largest read/write request negotiated, and one pool buffer (request + headers). */
#define QF_MAX_IO (1024 * 1024)
#define QF_BUF_SIZE (QF_MAX_IO + 4096)
#define QF_ROOT_INO 1
#define QF_FILE_INO 2
#define QF_FILE_NAME "disk.raw"

/* Operations handed to JS (first handler argument); keep in step with mount/backend-fuse3.ts. */
enum qf_op {
  QF_READ = 0,
  QF_WRITE = 1,
  QF_FLUSH = 2,
  QF_FSYNC = 3,
  QF_LSEEK = 4,
  QF_FALLOCATE = 5,
  /* not a request: the kernel dropped the mount (umount from outside) or reading failed */
  QF_UNMOUNTED = 6,
  /* setattr changing the size (truncate/ftruncate): offset = the new size; answered with fuse_reply_attr */
  QF_SETSIZE = 7,
};

enum qf_slot_state { SLOT_FREE, SLOT_BUSY, SLOT_PENDING };

struct qf_slot {
  char *mem;
  fuse_req_t req; /* while SLOT_PENDING */
  int op;
  int state;
  fuse_ino_t ino; /* the inode a QF_SETSIZE is for (its reply carries that inode's attributes) */
  napi_ref ab_ref; /* the ArrayBuffer over mem; its finalizer frees mem */
};

struct qf_attrs {
  double size;
  /* disk.raw's st_blocks (512-byte units): JS keeps it current with setFileAttrs() */
  double blocks;
  uint32_t file_mode, dir_mode, uid, gid;
  int read_only, direct_io;
  uint32_t max_read, max_write;
  struct timespec start, mtime;
};

struct qf_stats {
  double received;       /* requests read from the fd */
  double to_js;          /* requests handed to JS */
  double pool_full;      /* times receiving stopped because every buffer was taken */
  double interrupts;     /* INTERRUPTs for requests JS held */
  double late_replies;   /* replies that arrived after close (dropped) */
  double max_batch;      /* most requests read in one wake-up (> 1: several were queued at once) */
};

struct qf_session {
  napi_env env;
  struct fuse_session *se;
  uv_poll_t poll;
  int fd;
  int polling;
  int closed;       /* close() ran: no more requests, no replies */
  int unmounted;    /* the kernel side is gone (ENODEV) or reading failed */
  int handle_freed; /* the JS external was collected */
  int poll_closed;  /* uv_close finished (or never needed) */
  struct qf_slot *slots;
  int nslots;
  int *free_list;
  int nfree;
  int npending;
  int cur_slot; /* buffer being processed by fuse_session_process_buf, or -1 */
  napi_ref handler_ref;
  napi_async_context actx;
  struct qf_attrs a;
  struct qf_stats st;
  int read_errno; /* why receiving stopped, when not ENODEV */
};

/* ops.c */
extern const struct fuse_lowlevel_ops qf_ops;
/* The reply to a QF_SETSIZE JS accepted: the inode's attributes as they are now. */
void qf_reply_setsize(struct qf_session *s, fuse_req_t req, fuse_ino_t ino);

/* session.c: hand a request to JS (the current buffer becomes SLOT_PENDING). */
void qf_forward(struct qf_session *s, fuse_req_t req, int op, double off, double len, double arg);

/* mountwatch.c */
napi_value qf_watch_mounts(napi_env env, napi_callback_info info);
napi_value qf_unwatch_mounts(napi_env env, napi_callback_info info);

#endif
