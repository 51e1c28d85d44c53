/**
 * Composition root of the real process: load the config, start the sidecar, wire signals.
 * With `cli.ts`, the only code that touches `process` (signals, exit codes).
 *
 * Exit codes: 0 clean stop; 1 config or start-up error, with a message naming the cause.
 */
import { ConfigError } from './config/load.js'
import { loadCheckedConfig } from './flags/check.js'
import { signalActor, startSidecar, StartupError, type Sidecar } from './sidecar.js'

/** Time the process may take to exit on its own once the sidecar has stopped (within the budget). */
const LINGER_MS = 100
/** A shutdown budget under this still gets this long before the backstop exits 1. */
const BACKSTOP_MIN_MS = 1000

type Listeners = Awaited<ReturnType<typeof loadCheckedConfig>>['config']['listen']

/**
 * Why the sidecar could not start, naming the config key when a listener could not bind: the
 * one whose host (a name that does not resolve) or host and port (in use, not permitted) it was.
 */
function startupFailure (err: unknown, config: { listen: Listeners }): string {
  const e = err as NodeJS.ErrnoException & { address?: string, port?: number, hostname?: string }
  if (err instanceof StartupError) return e.message
  const listeners = Object.entries(config.listen).flatMap(([name, l]) => l === null ? [] : [{ name, host: l.host, port: l.port }])
  if (e.code === 'ENOTFOUND' || e.code === 'EAI_AGAIN') {
    const at = listeners.find((l) => l.host === e.hostname)
    if (at !== undefined) return `listen.${at.name}.host: cannot listen on "${at.host}": the name does not resolve to an address (${e.code})`
  }
  if (e.code === 'EADDRINUSE' || e.code === 'EACCES' || e.code === 'EADDRNOTAVAIL') {
    const at = listeners.find((l) => l.port === e.port && l.port !== 0) ?? listeners.find((l) => l.host === e.address)
    const why = e.code === 'EADDRINUSE' ? 'address already in use' : e.code === 'EACCES' ? 'permission denied' : 'the address is not one of this host\'s'
    return `${at === undefined ? '' : `listen.${at.name}: `}cannot listen on ${e.address ?? ''}:${e.port ?? ''}: ${why}`
  }
  return `start-up failed: ${e.message}`
}

export async function start (configPath: string): Promise<number> {
  // SIGHUP's default action ends the process: one sent during start-up (a config reloader, an
  // operator who just edited the file) would kill the sidecar without a word. It is held, and
  // honoured with one reload once the sidecar runs.
  let reloadWhenStarted = false
  const holdReload = (): void => { reloadWhenStarted = true }
  process.on('SIGHUP', holdReload)
  let loaded
  try {
    loaded = await loadCheckedConfig(configPath)
  } catch (err) {
    reportStartupError(err instanceof ConfigError ? err.problems : [(err as Error).message], configPath)
    return 1
  }
  let sidecar: Sidecar
  try {
    sidecar = await startSidecar(loaded.config, { adminToken: process.env.BREAKWATER_ADMIN_TOKEN, bare: process.env.BREAKWATER_BENCH_BARE === '1' })
  } catch (err) {
    reportStartupError([startupFailure(err, loaded.config)], configPath)
    return 1
  }
  for (const warning of loaded.warnings) sidecar.logger.warn({ event: 'config_warning' }, warning)

  // Whatever way the process ends (a crash, the backstop), the log lines it still holds go out.
  process.once('exit', () => { sidecar.flushLog() })
  process.on('uncaughtException', (err) => {
    sidecar.logger.fatal({ event: 'crash', err }, 'uncaught exception; exiting')
    process.exit(1)
  })
  process.removeListener('SIGHUP', holdReload)
  process.on('SIGHUP', () => { void sidecar.reload(signalActor('SIGHUP')) })
  if (reloadWhenStarted) void sidecar.reload(signalActor('SIGHUP'))

  return await new Promise<number>((resolve) => {
    const stop = (signal: string): void => {
      if (signal !== 'SIGTERM' && signal !== 'SIGINT') return
      process.removeAllListeners('SIGTERM')
      process.removeAllListeners('SIGINT')
      // A second signal cuts the drain short, and says so: requests it cuts are not the deadline's.
      const hurry = (second: string): void => {
        sidecar.logger.warn({ event: 'shutdown', phase: 'hurried', signal: second }, 'second signal: the drain is cut short')
        sidecar.hurry()
      }
      process.once('SIGTERM', () => hurry('SIGTERM'))
      process.once('SIGINT', () => hurry('SIGINT'))
      sidecar.logger.info({ event: 'shutdown', signal }, 'signal received')
      // SPEC §15: SIGTERM to exit within drainDelayMs + timeoutMs (25 s with defaults, under
      // Kubernetes' 30 s grace) whatever clients do. The sidecar cuts what still runs early
      // enough for its tear-down to fit; this backstop covers a step of the tear-down that
      // hangs, and exit() covers a handle that would keep the event loop alive after it.
      const { drainDelayMs, timeoutMs } = sidecar.config.shutdown
      exitAfterShutdown(sidecar.shutdown(), drainDelayMs + timeoutMs, {
        backstop: (afterMs) => { sidecar.logger.error({ event: 'shutdown', phase: 'backstop', afterMs }, 'shutdown did not finish in time; exiting') },
        failed: (err) => { sidecar.logger.error({ event: 'shutdown', err }, 'shutdown failed') },
        settled: resolve,
        exit: (code) => process.exit(code)
      })
    }
    process.once('SIGTERM', stop)
    process.once('SIGINT', stop)
  })
}

/** Human lines on stderr, one JSON line on stdout (every stdout line is JSON). */
function reportStartupError (problems: readonly string[], configPath: string): void {
  process.stderr.write(`breakwater: cannot start with ${configPath}:\n${problems.map((p) => `  ${p}`).join('\n')}\n`)
  process.stdout.write(JSON.stringify({ level: 'fatal', time: new Date().toISOString(), event: 'startup_failed', config: configPath, problems, msg: 'cannot start' }) + '\n')
}

export interface ShutdownHooks {
  /** The backstop fired: the shutdown had not settled `afterMs` after the signal. */
  backstop: (afterMs: number) => void
  /** The shutdown rejected. */
  failed: (err: unknown) => void
  /** The shutdown settled: the process's exit code. */
  settled: (code: number) => void
  /** End the process. */
  exit: (code: number) => void
}

/**
 * End the process once `shutdown` settles: 0 when it resolves, 1 when it rejects. The
 * backstop exits 1 if it has not settled after `budgetMs` (at least BACKSTOP_MIN_MS): a step
 * of the tear-down that hangs. Once the shutdown has settled, the backstop is off: a
 * shutdown that finished a little past its budget, on a machine too busy to run the backstop
 * first, still ends 0.
 */
export function exitAfterShutdown (shutdown: Promise<void>, budgetMs: number, hooks: ShutdownHooks): void {
  const end = performance.now() + budgetMs
  const afterMs = Math.max(budgetMs, BACKSTOP_MIN_MS)
  const backstop = setTimeout(() => {
    hooks.backstop(afterMs)
    hooks.exit(1)
  }, afterMs)
  backstop.unref()
  const settle = (code: number): void => {
    clearTimeout(backstop)
    hooks.settled(code)
    // Everything of ours is closed; whatever else still holds the event loop does not matter.
    setTimeout(() => hooks.exit(code), Math.max(0, Math.min(LINGER_MS, end - performance.now()))).unref()
  }
  shutdown.then(() => settle(0), (err) => {
    hooks.failed(err)
    settle(1)
  })
}
