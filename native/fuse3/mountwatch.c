/*
 * watchMounts(callback) -> handle; unwatchMounts(handle).
 *
 * The kernel flags /proc/self/mountinfo with POLLPRI|POLLERR whenever the
 * mount table of our namespace changes; the callback just says "something
 * changed", the caller reads the table.
 *
 * watchConnection(fd, callback) -> handle; unwatchConnection(handle).
 *
 * The end of a FUSE connection: /dev/fuse polls POLLERR once the kernel has
 * aborted or destroyed the connection (the last reference to the super block
 * is gone: after a plain unmount at once, after a lazy one when the last user
 * lets go). That, not the mount table, is when no request can come any more.
 * The fuse-native backend (libfuse 2 reads the fd in its own thread and tells
 * nobody) watches a dup of its session fd for it, from a small thread that
 * poll()s it asking for no events (POLLIN/POLLOUT do not wake it; POLLERR is
 * always reported) and then wakes the event loop; the callback runs once.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "qfuse.h"

struct qf_watch {
  napi_env env;
  uv_poll_t poll;
  int fd;
  int stopped;
  napi_ref cb_ref;
  napi_async_context actx;
};

static void on_change(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  struct qf_watch *w = h->data;
  if (w->stopped) return;
  /* Re-arm: the flag clears once the file is read from the start again. */
  char buf[256];
  lseek(w->fd, 0, SEEK_SET);
  while (read(w->fd, buf, sizeof(buf)) > 0) {
  }
  napi_handle_scope scope;
  if (napi_open_handle_scope(w->env, &scope) != napi_ok) return;
  napi_value fn, recv, result;
  if (napi_get_reference_value(w->env, w->cb_ref, &fn) == napi_ok && fn != NULL) {
    napi_get_global(w->env, &recv);
    if (napi_make_callback(w->env, w->actx, recv, fn, 0, NULL, &result) == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(w->env, &exc);
      napi_fatal_exception(w->env, exc);
    }
  }
  napi_close_handle_scope(w->env, scope);
}

static void on_closed(uv_handle_t *h) {
  free(h->data);
}

napi_value qf_watch_mounts(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1) {
    napi_throw_error(env, NULL, "watchMounts(callback)");
    return NULL;
  }
  struct qf_watch *w = calloc(1, sizeof(*w));
  uv_loop_t *loop;
  if (!w || napi_get_uv_event_loop(env, &loop) != napi_ok) {
    free(w);
    napi_throw_error(env, NULL, "watchMounts: no event loop");
    return NULL;
  }
  w->env = env;
  w->fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
  if (w->fd < 0 || uv_poll_init(loop, &w->poll, w->fd) != 0) {
    if (w->fd >= 0) close(w->fd);
    free(w);
    napi_throw_error(env, NULL, "watchMounts: cannot watch /proc/self/mountinfo");
    return NULL;
  }
  char buf[256];
  while (read(w->fd, buf, sizeof(buf)) > 0) {
  }
  w->poll.data = w;
  napi_create_reference(env, argv[0], 1, &w->cb_ref);
  napi_value name, resource, handle;
  napi_create_string_utf8(env, "qmount:mountwatch", NAPI_AUTO_LENGTH, &name);
  napi_create_object(env, &resource);
  napi_async_init(env, resource, name, &w->actx);
  uv_poll_start(&w->poll, UV_PRIORITIZED, on_change);
  /* A watch does not keep the process alive by itself. */
  uv_unref((uv_handle_t *)&w->poll);
  napi_create_external(env, w, NULL, NULL, &handle);
  return handle;
}

napi_value qf_unwatch_mounts(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *p = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_external(env, argv[0], &p) != napi_ok || p == NULL) {
    napi_throw_error(env, NULL, "unwatchMounts(handle)");
    return NULL;
  }
  struct qf_watch *w = p;
  if (w->stopped) return NULL;
  w->stopped = 1;
  uv_poll_stop(&w->poll);
  close(w->fd);
  napi_delete_reference(env, w->cb_ref);
  napi_async_destroy(env, w->actx);
  uv_close((uv_handle_t *)&w->poll, on_closed);
  return NULL;
}

struct qf_conn_watch {
  napi_env env;
  uv_async_t async;
  pthread_t thread;
  int fd;       /* our dup of the session fd */
  int wake[2];  /* a pipe: unwatch wakes the thread through it */
  int ended;    /* set by the thread: the connection is gone */
  int stopped;  /* JS side: no callback any more */
  int handle_freed, async_closed;
  napi_ref cb_ref;
  napi_async_context actx;
};

static void conn_free_maybe(struct qf_conn_watch *w) {
  if (w->handle_freed && w->async_closed) free(w);
}

static void on_async_closed(uv_handle_t *h) {
  struct qf_conn_watch *w = h->data;
  w->async_closed = 1;
  conn_free_maybe(w);
}

/* Runs on its own thread: poll(2) with no events asked for wakes only on POLLERR/POLLHUP/POLLNVAL. */
static void *conn_thread(void *arg) {
  struct qf_conn_watch *w = arg;
  struct pollfd p[2] = {{w->fd, 0, 0}, {w->wake[0], POLLIN, 0}};
  for (;;) {
    int r = poll(p, 2, -1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 || p[1].revents) return NULL;
    if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
      __atomic_store_n(&w->ended, 1, __ATOMIC_RELEASE);
      uv_async_send(&w->async);
      return NULL;
    }
  }
}

/* JS side: stop the thread and release everything but the struct (freed when JS and libuv are both done). */
static void conn_stop(struct qf_conn_watch *w) {
  if (w->stopped) return;
  w->stopped = 1;
  ssize_t n = write(w->wake[1], "x", 1);
  (void)n;
  pthread_join(w->thread, NULL);
  close(w->wake[0]);
  close(w->wake[1]);
  close(w->fd);
  napi_delete_reference(w->env, w->cb_ref);
  napi_async_destroy(w->env, w->actx);
  uv_close((uv_handle_t *)&w->async, on_async_closed);
}

static void on_conn_ended(uv_async_t *h) {
  struct qf_conn_watch *w = h->data;
  if (w->stopped || !__atomic_load_n(&w->ended, __ATOMIC_ACQUIRE)) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value fn = NULL, recv, result;
  napi_get_reference_value(env, w->cb_ref, &fn);
  napi_async_context actx = w->actx;
  if (fn != NULL) {
    napi_get_global(env, &recv);
    if (napi_make_callback(env, actx, recv, fn, 0, NULL, &result) == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
  }
  conn_stop(w); /* once */
  napi_close_handle_scope(env, scope);
}

static void conn_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  struct qf_conn_watch *w = data;
  conn_stop(w);
  w->handle_freed = 1;
  conn_free_maybe(w);
}

napi_value qf_watch_connection(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_error(env, NULL, "watchConnection(fd, callback)");
    return NULL;
  }
  struct qf_conn_watch *w = calloc(1, sizeof(*w));
  uv_loop_t *loop;
  if (!w || napi_get_uv_event_loop(env, &loop) != napi_ok) {
    free(w);
    napi_throw_error(env, NULL, "watchConnection: no event loop");
    return NULL;
  }
  w->env = env;
  /*
   * Our own descriptor on the same open file (libfuse closes its fd when its
   * loop ends). Not watched with uv_poll: uv_poll_init makes the fd
   * O_NONBLOCK, a flag of the open file that libfuse 2's blocking readers
   * share; a read answering EAGAIN ends libfuse 2's loop.
   */
  w->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (w->fd < 0 || pipe2(w->wake, O_CLOEXEC) != 0) {
    if (w->fd >= 0) close(w->fd);
    free(w);
    napi_throw_error(env, NULL, "watchConnection: bad fd");
    return NULL;
  }
  if (uv_async_init(loop, &w->async, on_conn_ended) != 0) {
    close(w->fd);
    close(w->wake[0]);
    close(w->wake[1]);
    free(w);
    napi_throw_error(env, NULL, "watchConnection: cannot create the notification");
    return NULL;
  }
  w->async.data = w;
  napi_create_reference(env, argv[1], 1, &w->cb_ref);
  napi_value name, resource, handle;
  napi_create_string_utf8(env, "qmount:connwatch", NAPI_AUTO_LENGTH, &name);
  napi_create_object(env, &resource);
  napi_async_init(env, resource, name, &w->actx);
  if (pthread_create(&w->thread, NULL, conn_thread, w) != 0) {
    w->stopped = 1;
    close(w->fd);
    close(w->wake[0]);
    close(w->wake[1]);
    napi_delete_reference(env, w->cb_ref);
    napi_async_destroy(env, w->actx);
    w->handle_freed = 1;
    uv_close((uv_handle_t *)&w->async, on_async_closed);
    napi_throw_error(env, NULL, "watchConnection: cannot start the watching thread");
    return NULL;
  }
  napi_create_external(env, w, conn_finalize, NULL, &handle);
  return handle;
}

napi_value qf_unwatch_connection(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *p = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_external(env, argv[0], &p) != napi_ok || p == NULL) {
    napi_throw_error(env, NULL, "unwatchConnection(handle)");
    return NULL;
  }
  conn_stop(p);
  return NULL;
}
