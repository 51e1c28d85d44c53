/**
 * Plumbing for tests that run real third-party services (etcd, Alertmanager) as child
 * processes: a free loopback port and a stop that cannot hang.
 */
import type { ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'

/** A port nobody listens on right now (bind port 0, read it, close). */
export async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address !== null ? address.port : 0
      server.close(() => { resolve(port) })
    })
  })
}

/** SIGTERM (or `signal`), then SIGKILL after 5 s; resolves once the process is gone. */
export async function stopProcess (proc: ChildProcess | null, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (proc === null || proc.exitCode !== null || proc.signalCode !== null) return
  const exited = new Promise<void>((resolve) => proc.once('exit', () => { resolve() }))
  proc.kill('SIGCONT')
  proc.kill(signal)
  const timer = setTimeout(() => proc.kill('SIGKILL'), 5000)
  await exited
  clearTimeout(timer)
}
