/**
 * Daemon mode and the readiness protocol.
 *
 * `qmount IMAGE DIR` without -f re-runs itself as a detached child (own
 * session, stdio on /dev/null) in foreground mode and waits on a pipe at the
 * child's fd 3 (named by the environment variable QMOUNT_READY_FD) for one
 * JSON line:
 *   {"ok":true,"pid":N}                      the mount is ready
 *   {"ok":false,"code":C,"message":"..."}    the child gave up; exit code C
 * The parent then exits (0, or C after printing the message). End of file
 * without a line means the child died: the parent reports its exit status.
 * Any supervisor (and the test helper) can use the same protocol with -f.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';

export const READY_FD_ENV = 'QMOUNT_READY_FD';

export interface ReadyMessage {
  ok: boolean;
  pid?: number;
  code?: number;
  message?: string;
}

/** Child side: the readiness channel handed down by the parent, if any. */
export class ReadyChannel {
  private fd: number | undefined;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /** Take the channel from the environment (and keep it from our own children). */
  static fromEnv(): ReadyChannel | undefined {
    const v = process.env[READY_FD_ENV];
    delete process.env[READY_FD_ENV];
    if (!v || !/^\d+$/.test(v)) return undefined;
    return new ReadyChannel(Number(v));
  }

  private send(msg: ReadyMessage): void {
    if (this.fd === undefined) return;
    const fd = this.fd;
    this.fd = undefined;
    try {
      fs.writeSync(fd, `${JSON.stringify(msg)}\n`);
    } catch {
      // the parent is gone: nobody to tell
    }
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
  }

  ready(): void {
    this.send({ ok: true, pid: process.pid });
  }

  fail(code: number, message: string): void {
    this.send({ ok: false, code, message });
  }
}

/**
 * Parent side: start `node <script> --foreground <args>` detached and wait
 * for its readiness line. Resolves to the parent's exit code; prints the
 * child's one-line reason on failure.
 */
export function runDaemonParent(script: string, args: string[], printError: (msg: string) => void): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, script, '--foreground', ...args], {
      detached: true,
      stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
      env: { ...process.env, [READY_FD_ENV]: '3' },
    });
    const pipe = child.stdio[3] as NodeJS.ReadableStream & { destroy(): void };
    let text = '';
    let settled = false;
    let exitStatus: string | undefined;
    const finish = (code: number, error?: string): void => {
      if (settled) return;
      settled = true;
      if (error) printError(error);
      pipe.destroy();
      child.unref();
      resolve(code);
    };
    child.on('error', (err) => finish(2, `cannot start the mount daemon: ${err.message}`));
    // Ctrl-C reaches only us (the child has its own session): pass it on, then wait for the child's answer.
    const forward = (): void => {
      if (!settled) child.kill('SIGTERM');
    };
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, forward);
    child.on('exit', (code, signal) => {
      exitStatus = signal ? `signal ${signal}` : `code ${code}`;
    });
    pipe.setEncoding('utf8');
    pipe.on('data', (chunk: string) => {
      text += chunk;
      const nl = text.indexOf('\n');
      if (nl < 0) return;
      let msg: ReadyMessage;
      try {
        msg = JSON.parse(text.slice(0, nl)) as ReadyMessage;
      } catch {
        finish(2, 'the mount daemon sent a garbled readiness message');
        return;
      }
      if (msg.ok) finish(0);
      else finish(msg.code ?? 2, msg.message ?? 'the mount daemon failed');
    });
    pipe.on('end', () => {
      if (settled) return;
      // No line: the child died. Wait for its status to say how.
      const report = (): void => finish(2, `the mount daemon exited before the mount was ready (${exitStatus ?? 'unknown status'})`);
      if (exitStatus !== undefined) report();
      else child.once('exit', () => setImmediate(report));
    });
  });
}
