/*
 * watchMounts(callback) -> handle; unwatchMounts(handle).
 *
 * The kernel flags /proc/self/mountinfo with POLLPRI|POLLERR whenever the
 * mount table of our namespace changes. The fuse-native backend (libfuse 2
 * gives no unmount notice of its own) uses this to learn at once that its
 * mount went away, instead of reading mountinfo on a timer; the callback
 * just says "something changed", the caller reads the table.
 */
#include <fcntl.h>
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
