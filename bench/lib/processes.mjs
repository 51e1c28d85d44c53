// Starting, pinning, readiness-polling and stopping of the processes the
// benchmark owns. Every child runs in its own process group so that its own
// children (nginx workers) are stopped with it.
import { spawn, execFileSync, spawnSync } from 'node:child_process'
import { openSync, closeSync, readFileSync } from 'node:fs'
import { request } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { createServer } from 'node:net'
import { processTree } from './procfs.mjs'

const live = new Set()

export const hasTaskset = spawnSync('taskset', ['-V']).status === 0

export function commandExists (cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.trim() : null
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort () {
  return new Promise((resolve, reject) => {
    const srv = createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

/**
 * Start `cmd args` pinned to `cpu` (via taskset when available).
 * stdout/stderr: a file path, 'ignore' (/dev/null) or undefined (a file is
 * not kept).
 */
export function startProcess ({ name, cmd, args = [], cpu, env = process.env, cwd, stdout = 'ignore', stderr = 'ignore' }) {
  const fds = []
  const open = (target) => {
    if (target === 'ignore') return 'ignore'
    const fd = openSync(target, 'w')
    fds.push(fd)
    return fd
  }
  const stdio = ['ignore', open(stdout), open(stderr)]
  const [file, argv] = hasTaskset && cpu !== undefined
    ? ['taskset', ['-c', String(cpu), cmd, ...args]]
    : [cmd, args]
  const child = spawn(file, argv, { stdio, env, cwd, detached: true })
  for (const fd of fds) closeSync(fd)
  const proc = {
    name,
    child,
    pid: child.pid,
    stdoutFile: stdout !== 'ignore' ? stdout : null,
    stderrFile: stderr !== 'ignore' ? stderr : null,
    exited: false,
    exitInfo: null,
    spawnError: null
  }
  live.add(proc)
  child.on('error', (err) => {
    proc.spawnError = err
    proc.exited = true
    live.delete(proc)
  })
  child.on('exit', (code, signal) => {
    proc.exited = true
    proc.exitInfo = { code, signal }
    live.delete(proc)
  })
  return proc
}

/** Process ids of the process and its descendants (e.g. nginx master + worker). */
export function pidsOf (proc) {
  if (proc.exited) return []
  return processTree(proc.pid)
}

/** Move every thread of every process in the tree to `cpu`. */
export function pinTree (pids, cpu) {
  if (!hasTaskset) return
  for (const pid of pids) {
    try {
      execFileSync('taskset', ['-a', '-p', '-c', String(cpu), String(pid)], { stdio: 'ignore' })
    } catch {}
  }
}

export function tail (file, lines = 15) {
  if (!file) return ''
  try {
    return readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n')
  } catch {
    return ''
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
export { sleep }

/** One GET; resolves to the status code, or null on error/timeout. */
export function httpStatus (url, timeoutMs = 1000) {
  return new Promise((resolve) => {
    // An https target's certificate is the run's own, self-signed: readiness does not verify it.
    const send = url.startsWith('https:') ? httpsRequest : request
    const req = send(url, { agent: false, timeout: timeoutMs, headers: { connection: 'close' }, rejectUnauthorized: false }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode))
      res.on('error', () => resolve(null))
    })
    req.on('timeout', () => req.destroy(new Error('timeout')))
    req.on('error', () => resolve(null))
    req.end()
  })
}

/**
 * Poll the URLs until each answers 200. Throws with a reason if the process
 * exits or the deadline passes.
 */
export async function waitReady (proc, urls, timeoutMs) {
  const deadline = Date.now() + timeoutMs
  for (const url of urls) {
    for (;;) {
      if (proc.spawnError) throw new Error(`could not spawn: ${proc.spawnError.message}`)
      if (proc.exited) {
        const { code, signal } = proc.exitInfo ?? {}
        throw new Error(`exited (code ${code}, signal ${signal})`)
      }
      const status = await httpStatus(url)
      if (status === 200) break
      if (Date.now() > deadline) {
        throw new Error(`${url} did not answer 200 within ${timeoutMs} ms (last: ${status ?? 'no answer'})`)
      }
      await sleep(100)
    }
  }
}

/** SIGTERM the process group, SIGKILL after graceMs. */
export async function stopProcess (proc, graceMs = 3000) {
  if (proc.exited) return
  try {
    process.kill(-proc.pid, 'SIGTERM')
  } catch {}
  const deadline = Date.now() + graceMs
  while (!proc.exited && Date.now() < deadline) await sleep(50)
  try {
    process.kill(-proc.pid, 'SIGKILL')
  } catch {}
  while (!proc.exited && Date.now() < deadline + 1000) await sleep(20)
}

export async function stopAll () {
  await Promise.all([...live].map((p) => stopProcess(p)))
}

/** Synchronous last resort (exit handlers): SIGKILL every group still alive. */
export function killAllNow () {
  for (const proc of live) {
    try {
      process.kill(-proc.pid, 'SIGKILL')
    } catch {}
  }
  live.clear()
}
