/*
 * Node-API side of the libfuse 3 binding: mount, the receive loop on the
 * event loop, close; the module's whole API is listed here (replies from JS
 * are reply.c).
 *
 *   mount(mountPoint, options, attrs, nbuffers, handler)
 *       -> { handle, buffers: ArrayBuffer[], fileReplyMax }
 *     options: the "-o" list for fuse_session_new (fsname, subtype, max_read,
 *     ro, allow_other, ...); attrs: { dirMode, uid, gid, readOnly, directIo,
 *     maxRead, maxWrite, nodes }. nodes: the tree, root first, inode =
 *     index + 1: [{ parent, name, dir, mode, nlink, size, blocks, readOnly,
 *     keepCache }] (parent: an inode before this node's, a directory).
 *     handler(op, slot, offset, length, arg, ino) is called for each data
 *     request (op: enum qf_op; slot: index into buffers; arg: a write's data
 *     offset in its buffer, fsync's datasync, lseek's whence, fallocate's
 *     mode; offset: QF_SETSIZE's new size; ino: the file's inode), and once
 *     with QF_UNMOUNTED (arg: 0, or the errno that stopped receiving; ino 0).
 *   reply(handle, slot, result): result >= 0 is the answer (read: bytes
 *     placed at the start of buffers[slot]; write: bytes written; lseek: the
 *     offset; QF_SETSIZE: 0, once setFile has the new size; others: 0),
 *     < 0 is -errno. May be called at once or later.
 *   replyFd(handle, slot, fd, position, length) -> 0 | errno: answer a read
 *     with `length` bytes of file descriptor fd at `position` instead, spliced
 *     (filereply.c); lengths up to the mount result's fileReplyMax. An errno
 *     (the file could not be read, or the reply does not fit the pipe): nothing
 *     was sent, the read still waits for reply().
 *   invalidate(handle, ino, offset, length): drop the kernel's cached pages
 *     of that range of a file (another file showing the same bytes was
 *     written); asynchronous, on a thread of its own (inval.c).
 *   setFile(handle, ino, size, blocks): new size / st_blocks of a file (after
 *     a resize, or as the allocation changes); getattr answers them from then on.
 *   close(handle): stop receiving, answer EIO to anything still held, close
 *     the session fd (after an unmount, or to abort a still-mounted one).
 *     The mount point itself is unmounted by the caller (fusermount).
 *   stats(handle) -> counters.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <linux/fuse.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qfuse.h"

static void inval_counts(struct qf_session *s) {
  if (s->inval) qf_inval_counts(s->inval, &s->st.inval_sent, &s->st.inval_failed);
}

void qf_release_slot(struct qf_session *s, int idx) {
  s->slots[idx].state = SLOT_FREE;
  s->slots[idx].req = NULL;
  s->free_list[s->nfree++] = idx;
}

/* Call the JS handler; an exception there is fatal for the process (the JS side never throws). */
static void emit(struct qf_session *s, int op, int slot, double off, double len, double arg, fuse_ino_t ino) {
  napi_env env = s->env;
  napi_value fn, recv, argv[6], result;
  if (napi_get_reference_value(env, s->handler_ref, &fn) != napi_ok || fn == NULL) return;
  napi_get_global(env, &recv);
  napi_create_int32(env, op, &argv[0]);
  napi_create_int32(env, slot, &argv[1]);
  napi_create_double(env, off, &argv[2]);
  napi_create_double(env, len, &argv[3]);
  napi_create_double(env, arg, &argv[4]);
  napi_create_double(env, (double)ino, &argv[5]);
  napi_status st = napi_make_callback(env, s->actx, recv, fn, 6, argv, &result);
  if (st == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    if (slot >= 0 && s->slots[slot].state == SLOT_PENDING) {
      fuse_reply_err(s->slots[slot].req, EIO);
      s->npending--;
      s->slots[slot].state = SLOT_BUSY; /* freed by the receive loop */
    }
    napi_fatal_exception(env, exc);
  }
}

static void on_interrupt(fuse_req_t req, void *data) {
  (void)req;
  struct qf_session *s = data;
  s->st.interrupts++; /* the engine cannot cancel; the reply that follows is dropped by the kernel */
}

void qf_forward(struct qf_session *s, fuse_req_t req, fuse_ino_t ino, int op, double off, double len, double arg) {
  int idx = s->cur_slot;
  if (idx < 0 || s->slots[idx].state != SLOT_BUSY || s->closed) {
    fuse_reply_err(req, EIO);
    return;
  }
  struct qf_slot *sl = &s->slots[idx];
  sl->req = req;
  sl->op = op;
  sl->ino = ino;
  sl->unique = ((const struct fuse_in_header *)(sl->mem + QF_RECV_OFFSET))->unique;
  sl->state = SLOT_PENDING;
  s->npending++;
  s->st.to_js++;
  fuse_req_interrupt_func(req, on_interrupt, s);
  emit(s, op, idx, off, len, arg, ino);
}

static void stop_polling(struct qf_session *s) {
  if (s->polling) {
    uv_poll_stop(&s->poll);
    s->polling = 0;
  }
}

static void mark_unmounted(struct qf_session *s, int err) {
  if (s->unmounted) return;
  s->unmounted = 1;
  s->read_errno = err;
  /* Answers still to come fail quietly (libfuse does not print write errors of an exited session). */
  fuse_session_exit(s->se);
  stop_polling(s);
  if (!s->closed) emit(s, QF_UNMOUNTED, -1, 0, 0, err, 0);
}

static void receive(struct qf_session *s) {
  double batch = 0;
  uint64_t poll_until = 0; /* polling for the next request until then (0: not polling) */
  /*
   * One call of this loop runs for at most QF_RECEIVE_BUDGET_NS, then lets
   * the event loop run (timers, signals, thread-pool completions, other
   * mounts); the poll handle stays armed, so a queued request brings it back
   * at once. Without the bound a stream of requests answered in the same
   * tick, each caught by polling, would never give the loop back.
   */
  const uint64_t started = qf_mono_ns();
  while (!s->closed && !s->unmounted) {
    if (batch > s->st.max_batch) s->st.max_batch = batch;
    if (s->nfree == 0) {
      /* Every buffer is held by a request JS has not answered: stop reading until one is. */
      stop_polling(s);
      s->st.pool_full++;
      return;
    }
    int idx = s->free_list[--s->nfree];
    struct qf_slot *sl = &s->slots[idx];
    ssize_t n = read(s->fd, sl->mem + QF_RECV_OFFSET, QF_BUF_SIZE);
    if (n <= 0) {
      int err = n == 0 ? ENODEV : errno;
      s->free_list[s->nfree++] = idx;
      if (err == EAGAIN) {
        if (qf_poll_again(s, started, &poll_until)) continue;
        return;
      }
      /* EINTR; ENOENT: the request was interrupted before we read it. */
      if (err == EINTR || err == ENOENT) continue;
      /* ENODEV: unmounted (or the connection aborted). Anything else cannot be recovered either. */
      mark_unmounted(s, err == ENODEV ? 0 : err);
      return;
    }
    s->st.received++;
    if (poll_until != 0) {
      s->st.poll_hits++;
      poll_until = 0;
    }
    batch++;
    sl->state = SLOT_BUSY;
    s->cur_slot = idx;
    struct fuse_buf fb;
    memset(&fb, 0, sizeof(fb));
    fb.mem = sl->mem + QF_RECV_OFFSET;
    fb.size = (size_t)n;
    fb.fd = -1;
    fuse_session_process_buf(s->se, &fb);
    s->cur_slot = -1;
    if (sl->state == SLOT_BUSY) qf_release_slot(s, idx); /* answered in C (or already by JS) */
    if (fuse_session_exited(s->se)) {
      mark_unmounted(s, 0);
      return;
    }
    if (qf_mono_ns() - started > QF_RECEIVE_BUDGET_NS) return; /* the event loop's turn; the poll handle stays armed */
  }
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  (void)events;
  struct qf_session *s = handle->data;
  napi_handle_scope scope;
  if (napi_open_handle_scope(s->env, &scope) != napi_ok) return;
  /* libuv reports POLLERR as UV_EBADF: /dev/fuse says that when the mount is gone. */
  if (status == UV_EBADF) mark_unmounted(s, 0);
  else if (status < 0) mark_unmounted(s, -status);
  else {
    qf_poll_adapt(s);
    receive(s);
  }
  napi_close_handle_scope(s->env, scope);
}

void qf_start_polling(struct qf_session *s) {
  if (s->polling || s->closed || s->unmounted) return;
  if (uv_poll_start(&s->poll, UV_READABLE, on_poll) == 0) s->polling = 1;
}

static void free_nodes(struct qf_session *s) {
  for (int i = 0; s->nodes && i < s->nnodes; i++) free(s->nodes[i].name);
  free(s->nodes);
  s->nodes = NULL;
  s->nnodes = 0;
}

static void free_session(struct qf_session *s) {
  qf_pipe_close(s);
  free_nodes(s);
  free(s->slots);
  free(s->free_list);
  free(s);
}

static void on_poll_closed(uv_handle_t *h) {
  struct qf_session *s = h->data;
  s->poll_closed = 1;
  if (s->handle_freed) free_session(s);
}

static void handle_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  struct qf_session *s = data;
  s->handle_freed = 1;
  if (s->poll_closed) free_session(s);
}

static void buffer_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  free(data);
}

static int get_prop_double(napi_env env, napi_value obj, const char *name, double *out) {
  napi_value v;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  return napi_get_value_double(env, v, out) == napi_ok ? 0 : -1;
}

static int get_prop_bool(napi_env env, napi_value obj, const char *name, int *out) {
  napi_value v;
  bool b = false;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  if (napi_get_value_bool(env, v, &b) != napi_ok) return -1;
  *out = b;
  return 0;
}

static int get_prop_u32(napi_env env, napi_value obj, const char *name, uint32_t *out) {
  double d;
  if (get_prop_double(env, obj, name, &d) != 0 || !(d >= 0 && d <= 0xffffffffu)) return -1;
  *out = (uint32_t)d;
  return 0;
}

/*
 * attrs.nodes -> s->nodes. The table must be a tree as mount/tree.ts builds
 * it: node 0 the root directory; every other node's parent an earlier
 * directory; names 1..QF_MAX_NAME bytes without '/'. Returns 0 or -1.
 */
static int read_nodes(napi_env env, napi_value attrs, struct qf_session *s) {
  napi_value arr, item, v;
  uint32_t n = 0;
  if (napi_get_named_property(env, attrs, "nodes", &arr) != napi_ok || napi_get_array_length(env, arr, &n) != napi_ok) return -1;
  if (n < 1 || n > QF_MAX_NODES) return -1;
  s->nodes = calloc(n, sizeof(*s->nodes));
  if (!s->nodes) return -1;
  s->nnodes = (int)n;
  for (uint32_t i = 0; i < n; i++) {
    struct qf_node *nd = &s->nodes[i];
    char name[QF_MAX_NAME + 2];
    size_t len = 0;
    double parent;
    if (napi_get_element(env, arr, i, &item) != napi_ok) return -1;
    if (napi_get_named_property(env, item, "name", &v) != napi_ok || napi_get_value_string_utf8(env, v, name, sizeof(name), &len) != napi_ok) return -1;
    int bad = get_prop_double(env, item, "parent", &parent);
    bad |= get_prop_bool(env, item, "dir", &nd->is_dir);
    bad |= get_prop_u32(env, item, "mode", &nd->mode);
    bad |= get_prop_u32(env, item, "nlink", &nd->nlink);
    bad |= get_prop_double(env, item, "size", &nd->size);
    bad |= get_prop_double(env, item, "blocks", &nd->blocks);
    bad |= get_prop_bool(env, item, "readOnly", &nd->read_only);
    bad |= get_prop_bool(env, item, "keepCache", &nd->keep_cache);
    if (bad) return -1;
    if (i == 0 ? (len != 0 || !nd->is_dir || parent != 1) : (len == 0 || len > QF_MAX_NAME || strchr(name, '/') != NULL)) return -1;
    if (i > 0 && !(parent >= 1 && parent <= i && s->nodes[(int)parent - 1].is_dir)) return -1;
    if (((nd->mode & S_IFMT) == S_IFDIR) != (nd->is_dir != 0)) return -1;
    nd->parent = (fuse_ino_t)parent;
    nd->name = strdup(name);
    if (!nd->name) return -1;
  }
  return 0;
}

struct qf_session *qf_get_session(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

napi_value qf_throw(napi_env env, const char *msg) {
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static napi_value qf_mount(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5) return qf_throw(env, "mount(mountPoint, options, attrs, nbuffers, handler)");
  char mnt[4096], opts[4096];
  size_t len;
  CHECK(env, napi_get_value_string_utf8(env, argv[0], mnt, sizeof(mnt), &len));
  CHECK(env, napi_get_value_string_utf8(env, argv[1], opts, sizeof(opts), &len));
  double d, nbuf;
  CHECK(env, napi_get_value_double(env, argv[3], &nbuf));
  if (nbuf < 1 || nbuf > 1024) return qf_throw(env, "nbuffers must be 1..1024");

  struct qf_session *s = calloc(1, sizeof(*s));
  if (!s) return qf_throw(env, "out of memory");
  s->env = env;
  s->fd = -1;
  s->cur_slot = -1;
  s->poll_closed = 1; /* until uv_poll_init */
  struct qf_attrs *a = &s->a;
  int bad = get_prop_double(env, argv[2], "dirMode", &d);
  a->dir_mode = (uint32_t)d;
  bad |= get_prop_double(env, argv[2], "uid", &d), a->uid = (uint32_t)d;
  bad |= get_prop_double(env, argv[2], "gid", &d), a->gid = (uint32_t)d;
  bad |= get_prop_double(env, argv[2], "maxRead", &d), a->max_read = (uint32_t)d;
  bad |= get_prop_double(env, argv[2], "maxWrite", &d), a->max_write = (uint32_t)d;
  bad |= get_prop_bool(env, argv[2], "readOnly", &a->read_only);
  bad |= get_prop_bool(env, argv[2], "directIo", &a->direct_io);
  if (bad || a->max_read > QF_MAX_IO || a->max_write > QF_MAX_IO || a->max_read < 4096 || a->max_write < 4096) {
    free(s);
    return qf_throw(env, "bad attrs");
  }
  if (read_nodes(env, argv[2], s) != 0) {
    free_nodes(s);
    free(s);
    return qf_throw(env, "bad attrs.nodes (a tree as mount/tree.ts builds it)");
  }
  clock_gettime(CLOCK_REALTIME, &a->start);
  qf_poll_init(&s->poll_state);
  for (int i = 0; i < s->nnodes; i++) s->nodes[i].mtime = a->start;

  qf_pipe_open(s); /* from here on free_session closes it */
  s->nslots = (int)nbuf;
  s->slots = calloc((size_t)s->nslots, sizeof(*s->slots));
  s->free_list = calloc((size_t)s->nslots, sizeof(int));
  napi_value buffers;
  CHECK(env, napi_create_array_with_length(env, (size_t)s->nslots, &buffers));
  for (int i = 0; s->slots && s->free_list && i < s->nslots; i++) {
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, QF_SLOT_SIZE) != 0) break;
    napi_value ab;
    if (napi_create_external_arraybuffer(env, mem, QF_SLOT_SIZE, buffer_finalize, NULL, &ab) != napi_ok) {
      free(mem);
      break;
    }
    s->slots[i].mem = mem;
    napi_create_reference(env, ab, 1, &s->slots[i].ab_ref);
    napi_set_element(env, buffers, (uint32_t)i, ab);
    /* Hand out low indexes first (LIFO): few buffers get touched under light load. */
    s->free_list[s->nslots - 1 - i] = i;
  }
  s->nfree = s->nslots;
  if (!s->slots || !s->free_list || s->slots[s->nslots - 1].mem == NULL) {
    /* buffers already created are freed by their finalizers */
    free_session(s);
    return qf_throw(env, "cannot allocate the request buffers");
  }

  char *fargv[] = {"qmount", "-o", opts, NULL};
  struct fuse_args args = FUSE_ARGS_INIT(opts[0] ? 3 : 1, fargv);
  s->se = fuse_session_new(&args, &qf_ops, sizeof(qf_ops), s);
  fuse_opt_free_args(&args);
  if (!s->se) goto fail_msg_opts;
  if (fuse_session_mount(s->se, mnt) != 0) {
    fuse_session_destroy(s->se);
    goto fail_msg_mount;
  }
  s->fd = fuse_session_fd(s->se);
  int fl = fcntl(s->fd, F_GETFL);
  if (fl < 0 || fcntl(s->fd, F_SETFL, fl | O_NONBLOCK) < 0) goto fail_after_mount;

  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) goto fail_after_mount;
  if (uv_poll_init(loop, &s->poll, s->fd) != 0) goto fail_after_mount;
  s->poll.data = s;
  s->poll_closed = 0;
  napi_value name;
  napi_create_string_utf8(env, "qmount:fuse3", NAPI_AUTO_LENGTH, &name);
  napi_value resource;
  napi_create_object(env, &resource);
  napi_async_init(env, resource, name, &s->actx);
  napi_create_reference(env, argv[4], 1, &s->handler_ref);
  qf_start_polling(s);

  napi_value result, handle;
  CHECK(env, napi_create_external(env, s, handle_finalize, NULL, &handle));
  CHECK(env, napi_create_object(env, &result));
  napi_set_named_property(env, result, "handle", handle);
  napi_set_named_property(env, result, "buffers", buffers);
  napi_value frm;
  napi_create_double(env, (double)QF_FILE_REPLY_MAX(s), &frm);
  napi_set_named_property(env, result, "fileReplyMax", frm);
  return result;

fail_after_mount:
  fuse_session_unmount(s->se);
  fuse_session_destroy(s->se);
  for (int i = 0; i < s->nslots; i++) napi_delete_reference(env, s->slots[i].ab_ref);
  free_session(s);
  return qf_throw(env, "cannot watch the FUSE session fd");
fail_msg_opts:
  for (int i = 0; i < s->nslots; i++) napi_delete_reference(env, s->slots[i].ab_ref);
  free_session(s);
  return qf_throw(env, "fuse_session_new refused the options (libfuse printed why on stderr)");
fail_msg_mount:
  for (int i = 0; i < s->nslots; i++) napi_delete_reference(env, s->slots[i].ab_ref);
  free_session(s);
  return qf_throw(env, "fuse_session_mount failed (libfuse printed why on stderr)");
}

static napi_value qf_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 1 ? qf_get_session(env, argv[0]) : NULL;
  if (!s) return qf_throw(env, "close(handle)");
  if (s->closed) return NULL;
  if (s->cur_slot >= 0) return qf_throw(env, "close: called while a request is being dispatched");
  stop_polling(s);
  s->closed = 1;
  if (s->inval) {
    inval_counts(s);
    qf_inval_stop(s->inval); /* the thread has its own fd: it may still finish a write after this */
    s->inval = NULL;
  }
  for (int i = 0; i < s->nslots; i++) {
    if (s->slots[i].state == SLOT_PENDING) {
      fuse_reply_err(s->slots[i].req, EIO);
      s->slots[i].state = SLOT_FREE;
      s->npending--;
    }
    napi_delete_reference(env, s->slots[i].ab_ref);
    s->slots[i].ab_ref = NULL;
  }
  /* Closes the fd (which aborts the connection if the mount is still there). */
  fuse_session_destroy(s->se);
  s->se = NULL;
  s->fd = -1;
  napi_delete_reference(env, s->handler_ref);
  s->handler_ref = NULL;
  napi_async_destroy(env, s->actx);
  if (!s->poll_closed) uv_close((uv_handle_t *)&s->poll, on_poll_closed);
  return NULL;
}

static napi_value qf_set_file(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 4 ? qf_get_session(env, argv[0]) : NULL;
  double ino, size, blocks;
  if (!s || napi_get_value_double(env, argv[1], &ino) != napi_ok || napi_get_value_double(env, argv[2], &size) != napi_ok ||
      napi_get_value_double(env, argv[3], &blocks) != napi_ok) {
    return qf_throw(env, "setFile(handle, ino, size, blocks)");
  }
  struct qf_node *n = ino >= 1 && ino <= s->nnodes ? qf_node(s, (fuse_ino_t)ino) : NULL;
  if (n == NULL || n->is_dir || !(size >= 0) || !(blocks >= 0)) return qf_throw(env, "setFile: not a file, or a negative size");
  n->size = size;
  n->blocks = blocks;
  return NULL;
}

static napi_value qf_invalidate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 4 ? qf_get_session(env, argv[0]) : NULL;
  double ino, off, len;
  if (!s || napi_get_value_double(env, argv[1], &ino) != napi_ok || napi_get_value_double(env, argv[2], &off) != napi_ok ||
      napi_get_value_double(env, argv[3], &len) != napi_ok) {
    return qf_throw(env, "invalidate(handle, ino, offset, length)");
  }
  if (s->closed || s->unmounted) return NULL;
  if (s->inval == NULL) s->inval = qf_inval_new(s->fd, s->nnodes);
  if (s->inval == NULL || qf_inval_queue(s->inval, (uint64_t)ino, off, len) != 0) s->st.inval_unqueued++;
  return NULL;
}

static napi_value qf_stats(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  struct qf_session *s = argc == 1 ? qf_get_session(env, argv[0]) : NULL;
  if (!s) return qf_throw(env, "stats(handle)");
  napi_value o, v;
  CHECK(env, napi_create_object(env, &o));
#define PUT(name, val)                   \
  napi_create_double(env, (val), &v);    \
  napi_set_named_property(env, o, name, v)
  PUT("received", s->st.received);
  PUT("toJs", s->st.to_js);
  PUT("poolFull", s->st.pool_full);
  PUT("interrupts", s->st.interrupts);
  PUT("lateReplies", s->st.late_replies);
  PUT("fileReplyMax", (double)QF_FILE_REPLY_MAX(s));
  PUT("fileReplies", s->st.file_replies);
  PUT("fileReadErrors", s->st.file_read_errors);
  PUT("fileSendErrors", s->st.file_send_errors);
  PUT("maxBatch", s->st.max_batch);
  inval_counts(s);
  PUT("invalSent", s->st.inval_sent);
  PUT("invalFailed", s->st.inval_failed);
  PUT("invalUnqueued", s->st.inval_unqueued);
  PUT("pending", s->npending);
  PUT("pollHits", s->st.poll_hits);
  PUT("pollMisses", s->st.poll_misses);
  PUT("pollWindowUs", (double)s->poll_state.ns / 1000);
  PUT("buffers", s->nslots);
#undef PUT
  return o;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    {"mount", NULL, qf_mount, NULL, NULL, NULL, napi_default, NULL},
    {"reply", NULL, qf_reply, NULL, NULL, NULL, napi_default, NULL},
    {"replyFd", NULL, qf_reply_fd, NULL, NULL, NULL, napi_default, NULL},
    {"close", NULL, qf_close, NULL, NULL, NULL, napi_default, NULL},
    {"setFile", NULL, qf_set_file, NULL, NULL, NULL, napi_default, NULL},
    {"invalidate", NULL, qf_invalidate, NULL, NULL, NULL, napi_default, NULL},
    {"stats", NULL, qf_stats, NULL, NULL, NULL, napi_default, NULL},
    {"watchMounts", NULL, qf_watch_mounts, NULL, NULL, NULL, napi_default, NULL},
    {"unwatchMounts", NULL, qf_unwatch_mounts, NULL, NULL, NULL, napi_default, NULL},
    {"watchConnection", NULL, qf_watch_connection, NULL, NULL, NULL, napi_default, NULL},
    {"unwatchConnection", NULL, qf_unwatch_connection, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  napi_value v;
  napi_create_uint32(env, QF_MAX_IO, &v);
  napi_set_named_property(env, exports, "maxIo", v);
  napi_create_uint32(env, fuse_version(), &v);
  napi_set_named_property(env, exports, "libfuseVersion", v);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
