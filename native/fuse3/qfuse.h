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
 * the node table JS gave at mount (struct qf_node: the mount's small static
 * tree; JS keeps each file's size and st_blocks current with setFile);
 * read, write, flush, fsync, lseek (SEEK_DATA/SEEK_HOLE), fallocate and
 * size changes (QF_SETSIZE) go to JS with the file's inode and the index of
 * the buffer holding the request, and the buffer
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

#include "inval.h"

/** Largest read/write request negotiated, and what one read of /dev/fuse may bring (request + headers). */
#define QF_MAX_IO (1024 * 1024)
#define QF_BUF_SIZE (QF_MAX_IO + 4096)
/*
 * Where in its pool buffer a request is received: so far in that a WRITE's
 * data (after fuse_in_header and fuse_write_in, 40 bytes each since protocol
 * 7.9) starts on a page boundary. The kernel copies a request into our
 * buffer one destination page at a time; with the data page-aligned each
 * 4 KiB of it is one aligned copy instead of two unaligned pieces (measured,
 * 1 MiB zero writes at qd4, alternating: 7% less CPU per request, 7% more
 * throughput), and the engine's O_DIRECT write of that data gets an aligned
 * source. A read's reply is built from the buffer's start (page-aligned too),
 * over the request, which libfuse has parsed by then.
 */
#define QF_WRITE_HEADERS 80
#define QF_RECV_OFFSET (4096 - QF_WRITE_HEADERS)
/** Bytes of one pool buffer. */
#define QF_SLOT_SIZE (QF_RECV_OFFSET + QF_BUF_SIZE)
#define QF_ROOT_INO 1
/* Bounds of the node table (mount/tree.ts keeps the same). */
#define QF_MAX_NODES 4096
#define QF_MAX_NAME 255

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
  fuse_ino_t ino; /* the file the request is for */
  uint64_t unique; /* the kernel's id of the request (filereply.c writes its own reply header) */
  napi_ref ab_ref; /* the ArrayBuffer over mem; its finalizer frees mem */
};

/*
 * One file or directory of the mount's tree; inode = index + 1 (the root is
 * index 0). Fixed at mount: names, parents and kinds never change; a file's
 * size and blocks change only through setFile() from JS, its mtime with each
 * completed write.
 */
struct qf_node {
  fuse_ino_t parent; /* the root is its own parent */
  char *name;        /* "" for the root */
  int is_dir;
  uint32_t mode;     /* with the S_IF* bits */
  uint32_t nlink;
  double size, blocks;
  int read_only;     /* a write open is EROFS */
  int keep_cache;    /* 0: another file shows the same bytes, drop the page cache at open */
  struct timespec mtime;
};

struct qf_attrs {
  uint32_t dir_mode, uid, gid;
  int read_only, direct_io;
  uint32_t max_read, max_write;
  struct timespec start;
};

struct qf_stats {
  double received;       /* requests read from the fd */
  double to_js;          /* requests handed to JS */
  double pool_full;      /* times receiving stopped because every buffer was taken */
  double interrupts;     /* INTERRUPTs for requests JS held */
  double late_replies;   /* replies that arrived after close (dropped) */
  double max_batch;      /* most requests read in one wake-up (> 1: several were queued at once) */
  double inval_sent;     /* page-cache invalidations of aliased files sent (inval.c) */
  double inval_failed;   /* ... refused by the kernel (nothing cached, or unmounted) */
  double inval_unqueued; /* ... not queued (no thread, a bad range): a bug */
  double poll_hits;      /* requests caught by polling (no sleep, no wake-up) */
  double poll_misses;    /* polling windows that ran out (then the loop slept) */
  double file_replies;     /* reads answered from a file (replyFd, filereply.c) */
  double file_read_errors; /* ... not, since reading the file failed (JS answers them) */
  double file_send_errors; /* ... not, since sending failed (not ENOENT/ENODEV; JS answers them) */
};

/*
 * Adaptive polling of /dev/fuse (QEMU's poll-max-ns of its iothreads is the
 * model). When the receive loop finds no request and nothing waits for JS,
 * it goes on reading (non-blocking) for up to poll_ns before it returns to
 * the event loop's epoll. A request that arrives meanwhile costs no sleep
 * and no cross-CPU wake-up, which on a VM is most of a qd1 request's
 * latency. poll_ns adapts at each wake-up from epoll by how long the loop
 * slept: a sleep shorter than poll_max_ns means a longer window would have
 * caught the request (poll_ns doubles, from QF_POLL_START_NS), a longer one
 * means the device is idle (poll_ns drops to 0: an idle mount never spins).
 * QMOUNT_FUSE_POLL_US sets poll_max_ns at mount (0: never poll).
 * Only after a request of a file handle opened with O_DIRECT: such a
 * client waits for each answer (fio, dd iflag=direct). Buffered I/O comes
 * from the kernel's readahead and writeback, which queue several requests
 * anyway, and there polling only took CPU from the client (measured: a
 * buffered dd of 4 GiB at 0.4-0.55 GB/s polling, 1.2 GB/s without, the
 * spinning thread competing with dd on 2 vCPUs). Between two attempts a
 * pause of QF_POLL_GAP_NS: each read takes the connection's queue lock,
 * which the client side needs to queue its next request.
 */
struct qf_poll {
  uint64_t max_ns;
  uint64_t ns;          /* the current window */
  uint64_t slept_at;    /* when the loop last returned to epoll (0: not sleeping) */
  int direct;           /* the last data request came through an O_DIRECT handle */
};
/* fuse_file_info.fh bit: the handle was opened with O_DIRECT. */
#define QF_FH_DIRECT 1
#define QF_POLL_START_NS 4000
#define QF_POLL_DEFAULT_US 64
/* The spin-wait hint between polling attempts (x86 PAUSE; elsewhere none). */
#if defined(__x86_64__) || defined(__i386__)
#define QF_CPU_RELAX() __builtin_ia32_pause()
#else
#define QF_CPU_RELAX() ((void)0)
#endif
#ifndef QF_POLL_GAP_NS
#define QF_POLL_GAP_NS 2000
#endif
/* Longest one receive loop runs before the event loop gets its turn (session.c receive). */
#define QF_RECEIVE_BUDGET_NS 1000000

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
  struct qf_node *nodes;
  int nnodes;
  struct qf_stats st;
  int read_errno; /* why receiving stopped, when not ENODEV */
  struct qf_inval *inval; /* started by the first invalidate() call */
  struct qf_poll poll_state;
  int pipe_fd[2];  /* filereply.c's pipe (-1: none) */
  int pipe_pages;  /* its capacity in pages (0: no splicing) */
  int splice_off;  /* the image file cannot be spliced from (EINVAL): replyFd declines */
};

/*
 * filereply.c: answer read request `idx` with [pos, +len) of fd: 0 when
 * answered; else an errno (EMSGSIZE: too large for the pipe; EOPNOTSUPP:
 * splicing is off; or why reading the file or sending failed) and nothing
 * was sent, the request still waits.
 */
void qf_pipe_open(struct qf_session *s);
void qf_pipe_close(struct qf_session *s);
int qf_reply_file(struct qf_session *s, int idx, int fd, off_t pos, size_t len);
/* The largest reply qf_reply_file takes at any offset (0: none). */
#define QF_FILE_REPLY_MAX(s) \
  ((s)->pipe_pages < 3 ? 0 : (size_t)((s)->pipe_pages - 2) * 4096 > QF_MAX_IO ? QF_MAX_IO : (size_t)((s)->pipe_pages - 2) * 4096)

/* ops.c */
extern const struct fuse_lowlevel_ops qf_ops;
/* The reply to a QF_SETSIZE JS accepted: the inode's attributes as they are now. */
void qf_reply_setsize(struct qf_session *s, fuse_req_t req, fuse_ino_t ino);

/* session.c: hand a request for file `ino` to JS (the current buffer becomes SLOT_PENDING). */
void qf_forward(struct qf_session *s, fuse_req_t req, fuse_ino_t ino, int op, double off, double len, double arg);
/* session.c: put slot `idx` back on the free list. */
void qf_release_slot(struct qf_session *s, int idx);
/* session.c: watch the session fd again (a no-op while the pool is full or the session closed). */
void qf_start_polling(struct qf_session *s);
/* session.c: the session behind a JS handle, or NULL. */
struct qf_session *qf_get_session(napi_env env, napi_value v);
/* session.c: throw a JS Error with `msg`; returns NULL for the caller to return. */
napi_value qf_throw(napi_env env, const char *msg);

/* reply.c: reply(handle, slot, result) and replyFd(handle, slot, fd, position, length). */
napi_value qf_reply(napi_env env, napi_callback_info info);
napi_value qf_reply_fd(napi_env env, napi_callback_info info);

/* A Node-API call that must succeed: else throw and return NULL from the calling function. */
#define CHECK(env, call)                                          \
  do {                                                            \
    if ((call) != napi_ok) {                                      \
      napi_throw_error((env), NULL, "qmount_fuse3: " #call " failed"); \
      return NULL;                                                \
    }                                                             \
  } while (0)

/* The node of a known inode, or NULL. */
static inline struct qf_node *qf_node(struct qf_session *s, fuse_ino_t ino) {
  return ino >= 1 && ino <= (fuse_ino_t)s->nnodes ? &s->nodes[ino - 1] : NULL;
}

/* poll.c (struct qf_poll) */
uint64_t qf_mono_ns(void);
void qf_poll_init(struct qf_poll *p);
void qf_poll_adapt(struct qf_session *s);
int qf_poll_again(struct qf_session *s, uint64_t started, uint64_t *poll_until);

/* mountwatch.c */
napi_value qf_watch_mounts(napi_env env, napi_callback_info info);
napi_value qf_unwatch_mounts(napi_env env, napi_callback_info info);
napi_value qf_watch_connection(napi_env env, napi_callback_info info);
napi_value qf_unwatch_connection(napi_env env, napi_callback_info info);

#endif
