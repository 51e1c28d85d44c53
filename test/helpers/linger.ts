/**
 * For the fleet test files (etcd, gRPC clients, several sidecars in one process): once every
 * test of the file has ended and its teardowns have run, the process should exit by itself. On
 * a loaded machine it has twice lingered with every test passed, until tap's 300 s timeout
 * failed the file. This names what is still open (sockets with their ports, child processes,
 * timers) on stderr after a grace period, then ends the process with the exit code the tests
 * set, so a handle left behind is reported, not mistaken for a failed test.
 */
import t from 'tap'

const GRACE_MS = 20_000

function describe (handle: unknown): string {
  const h = handle as Record<string, any>
  const kind = String(h.constructor?.name ?? typeof handle)
  if (kind === 'Socket') return `Socket ${String(h.localPort)} -> ${String(h.remoteAddress)}:${String(h.remotePort)} (destroyed ${String(h.destroyed)}, connecting ${String(h.connecting)})`
  if (kind === 'ChildProcess') return `ChildProcess ${String(h.pid)} ${String(h.spawnfile)} (exit ${String(h.exitCode)}, signal ${String(h.signalCode)})`
  if (kind === 'Timeout') return `Timeout ${String(h._idleTimeout)} ms: ${String(h._onTimeout).slice(0, 120).replace(/\s+/g, ' ')}`
  return kind
}

t.teardown(() => {
  setTimeout(() => {
    const handles = (process as unknown as { _getActiveHandles: () => unknown[] })._getActiveHandles().map(describe)
    process.stderr.write(`every test ended ${GRACE_MS / 1000} s ago but the process is still held open by: ${JSON.stringify(process.getActiveResourcesInfo())}\n  ${handles.join('\n  ')}\n`)
    process.exit()
  }, GRACE_MS).unref()
})
