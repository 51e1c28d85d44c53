/**
 * A rollback command (`exec`, or one of the `git` commands of a GitOps rollback) run as its own
 * process group, so that a deadline bounds the whole of it:
 * - the command is the leader of a new group; a timeout signals the group, not the leader only:
 *   `SIGTERM`, then `SIGKILL` after `KILL_GRACE_MS` for whatever is still there. Killing the
 *   leader alone left `sh -c "sleep 12; …"`'s `sleep` running, holding the rollback for 12 s;
 * - the result is settled when the leader exits, plus at most `OUTPUT_WAIT_MS` for the rest of
 *   its output. Waiting for the pipes to close instead waits for every process that inherited
 *   them: a grandchild left running (a daemon, an `ssh` control master) held a rollback
 *   `running` long after its command had ended.
 */
import { spawn } from 'node:child_process'

/** Time a group has to stop after `SIGTERM` before it is sent `SIGKILL`. */
export const KILL_GRACE_MS = 2000

/** The longest the output of a command that has exited is waited for (grandchildren may hold its pipes). */
export const OUTPUT_WAIT_MS = 250

export interface CommandOptions {
  cwd?: string
  env: NodeJS.ProcessEnv
  /** The group is stopped (`SIGTERM`, then `SIGKILL`) this long after the start. */
  timeoutMs: number
  /** Aborting kills the group at once (`SIGKILL`): the sidecar is stopping. */
  signal?: AbortSignal
  /** Characters of output (stdout and stderr together) kept. */
  maxOutput: number
}

export interface CommandResult {
  /** The leader's exit code; null when a signal ended it, or it never started. */
  code: number | null
  /** The signal that ended the leader, if one did. */
  killSignal: NodeJS.Signals | null
  output: string
  /** Why the group was stopped: its timeout, or the abort signal; null when it ended on its own. */
  cut: 'timeout' | 'aborted' | null
  /** Set when the command could not be started. */
  error?: string
}

/** Run `argv` in its own process group within `timeoutMs`. Never rejects. */
export async function runCommand (argv: readonly string[], options: CommandOptions): Promise<CommandResult> {
  return await new Promise((resolve) => {
    const child = spawn(argv[0] as string, argv.slice(1), { cwd: options.cwd, env: options.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
    let output = ''
    const keep = (c: Buffer): void => { if (output.length < options.maxOutput) output += c.toString('utf8') }
    child.stdout.on('data', keep)
    child.stderr.on('data', keep)
    let cut: CommandResult['cut'] = null
    let settled = false
    const group = (signal: NodeJS.Signals): void => {
      if (child.pid === undefined) return
      try {
        process.kill(-child.pid, signal)
      } catch {
        // The group is gone (every member exited); the leader alone may remain if it left it.
        try { child.kill(signal) } catch {}
      }
    }
    const stop = (why: 'timeout' | 'aborted'): void => {
      if (cut !== null || settled) return
      cut = why
      if (why === 'aborted') { group('SIGKILL'); return }
      group('SIGTERM')
      // Also for members that outlive the leader: a grandchild that ignores SIGTERM still goes.
      setTimeout(() => group('SIGKILL'), KILL_GRACE_MS).unref()
    }
    const timer = setTimeout(() => stop('timeout'), options.timeoutMs)
    const onAbort = (): void => stop('aborted')
    if (options.signal?.aborted === true) onAbort()
    else options.signal?.addEventListener('abort', onAbort, { once: true })
    const finish = (result: Omit<CommandResult, 'output' | 'cut'>): void => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      options.signal?.removeEventListener('abort', onAbort)
      // Whatever still holds the pipes is not waited for, nor read from.
      child.stdout.destroy()
      child.stderr.destroy()
      resolve({ ...result, output: output.slice(0, options.maxOutput), cut })
    }
    child.on('error', (err) => {
      // Only a command that never started ends here: a failed kill() also emits 'error'.
      if (child.pid === undefined) finish({ code: null, killSignal: null, error: err.message })
    })
    child.on('exit', (code, killSignal) => {
      clearTimeout(timer)
      const result = { code, killSignal }
      // 'close' follows at once when nobody else holds the pipes.
      const wait = setTimeout(() => finish(result), OUTPUT_WAIT_MS)
      child.once('close', () => { clearTimeout(wait); finish(result) })
    })
  })
}
