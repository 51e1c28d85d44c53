/**
 * One sidecar per state dir, with real processes: a mistaken second start on the same config
 * leaves the running sidecar's admin token alone and says who holds the dir; a lock and temp
 * files left by kill -9 do not block the next start and are cleaned.
 */
import t, { type Test } from 'tap'
import { readFileSync, writeFileSync, existsSync, mkdirSync, utimesSync, statSync, readdirSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'
import { join } from 'node:path'
import { spawn, spawnSync } from 'node:child_process'
import { hostname } from 'node:os'
import { pathToFileURL } from 'node:url'
import { stringify } from 'yaml'
import { startUpstream } from './helpers/upstream.js'
import { startProcess, spawnCli, tempDir } from './helpers/process.js'
import { ROOT } from './helpers/root.js'
import { lockStateDir } from '../src/state/lock.js'
import { admin } from './helpers/admin.js'

const noEnvToken = { BREAKWATER_ADMIN_TOKEN: undefined }

t.test('a second start on the same config exits 1 naming the state dir and the pid holding it; the running sidecar keeps its token', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const first = await startProcess(t, { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }, noEnvToken)
  const stateDir = join(first.dir, 'state')
  const tokenPath = join(stateDir, 'admin.token')
  const token = readFileSync(tokenPath, 'utf8').trim()
  const listening = first.lines.find((l) => l.msg === 'listening') as Record<string, string>
  const port = (url: string): number => Number(new URL(url).port)

  // The same config again, as an operator would start it by mistake: same stateDir, same ports.
  const again = join(first.dir, 'again.yaml')
  writeFileSync(again, stringify({
    service: 'proc',
    version: '1.0.0',
    stateDir,
    listen: {
      proxy: { host: '127.0.0.1', port: port(listening.proxy as string) },
      ops: { host: '127.0.0.1', port: port(listening.ops as string) },
      admin: { host: '127.0.0.1', port: port(listening.admin as string) }
    },
    upstreams: { app: { url: up.url } },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }]
  }))
  // Options first: spawnCli then does not wait for a `listening` line that never comes.
  const second = await spawnCli(t, ['--config', again, 'start'], first.dir, again, noEnvToken)
  t.equal(await second.exited, 1, 'the second start exits 1')
  t.match(second.stderr(), stateDir, 'naming the state dir')
  t.match(second.stderr(), `pid ${String(first.child.pid)}`, 'and the pid holding it')
  t.equal(readFileSync(tokenPath, 'utf8').trim(), token, 'the running sidecar\'s token file is untouched')
  const state = await admin(listening.admin as string, 'GET', '/v1/state', undefined, token)
  t.equal(state.status, 200, 'the CLI\'s token still opens the running sidecar')
})

t.test('after kill -9: the stale lock does not block the next start, and leftover temp files are removed', async (t) => {
  const up = await startUpstream()
  t.teardown(up.close)
  const first = await startProcess(t, { upstreams: { app: { url: up.url } }, routes: [{ match: { pathPrefix: '/' }, upstream: 'app' }] }, noEnvToken)
  const stateDir = join(first.dir, 'state')
  const lockPath = join(stateDir, 'breakwater.lock')
  const dead = first.child.pid as number
  t.equal(readFileSync(lockPath, 'utf8').split('\n')[0], String(dead), 'the lock holds the owner\'s pid')
  first.child.kill('SIGKILL')
  await first.exited
  // What a kill -9 in the middle of atomic writes leaves behind.
  const leftovers = [`state.json.tmp-${dead}-3`, `state.json.tmp-${dead}-4`, `admin.token.tmp-${dead}`]
  for (const name of leftovers) writeFileSync(join(stateDir, name), '{"version": 1, "overr')
  t.ok(existsSync(lockPath), 'the killed sidecar\'s lock is still there')

  const second = await spawnCli(t, ['start', '--config', first.configPath], first.dir, first.configPath, noEnvToken)
  t.equal(second.child.exitCode, null, 'the next start runs')
  t.equal(readFileSync(lockPath, 'utf8').split('\n')[0], String(second.child.pid), 'and holds the lock')
  for (const name of leftovers) t.notOk(existsSync(join(stateDir, name)), `${name} removed`)
  const removed = second.lines.find((l) => l.event === 'state_temp_removed')
  t.same([...(removed?.files as string[] ?? [])].sort(), [...leftovers].sort(), 'and the removal is logged')
  t.ok(second.lines.some((l) => l.event === 'state_lock' && l.staleOwner === dead), 'the stale lock take-over is logged')

  second.child.kill('SIGTERM')
  t.equal(await second.exited, 0)
  t.notOk(existsSync(lockPath), 'a clean stop releases the lock')
})

/**
 * A racer: waits for the shared start instant, takes the lock with the built lockStateDir, says
 * whether it holds it, and keeps it (as a running sidecar would) until its parent ends it.
 */
const RACER = `
const { lockStateDir } = await import(process.argv[1])
const at = Number(process.argv[3])
while (Date.now() < at) {}
try {
  const lock = await lockStateDir(process.argv[2], process.pid, process.argv[4])
  process.stdout.write(lock.held ? 'held\\n' : 'unheld\\n')
} catch (err) {
  process.stdout.write(err.name === 'StateDirLocked' || /in use/.test(err.message) ? 'locked\\n' : 'error ' + err.message + '\\n')
}
process.stdin.resume()
process.stdin.on('end', () => process.exit(0))
`

/** Start `n` racers at one instant on `dir`; resolves with what each said, once all have. */
async function race (dir: string, n: number, lockModule: string, method = 'link'): Promise<{ said: string[], stop: () => Promise<void> }> {
  const at = Date.now() + 400
  const children = Array.from({ length: n }, () => spawn(process.execPath, ['--input-type=module', '-e', RACER, lockModule, dir, String(at), method], { stdio: ['pipe', 'pipe', 'inherit'] }))
  const said = await Promise.all(children.map(async (child) => await new Promise<string>((resolve) => {
    let out = ''
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString()
      if (out.includes('\n')) resolve(out.trim())
    })
    child.on('exit', () => { resolve(out.trim()) })
  })))
  const stop = async (): Promise<void> => {
    await Promise.all(children.map(async (child) => await new Promise<void>((resolve) => {
      if (child.exitCode !== null) { resolve(); return }
      child.on('exit', () => { resolve() })
      child.stdin.end()
    })))
  }
  return { said, stop }
}

t.test('sidecars starting at the same instant on one state dir: exactly one holds it, on a fresh dir and over a stale lock', async (t) => {
  await raceRounds(t, 24, 'link')
})

t.test('a lock written by a sidecar on another host (a shared volume) is never taken over by a pid check, only once its lease lapses', async (t) => {
  const dir = tempDir(t)
  const lockFile = join(dir, 'breakwater.lock')
  // A pid that is dead here says nothing about a process on another host.
  const pid = deadPid()
  writeFileSync(lockFile, `${pid}\nother-node-7\n`)
  await t.rejects(lockStateDir(dir), { name: 'StateDirLocked', message: /other-node-7.*renewed for 30 s/ }, 'refused while renewed, naming the host that holds it')
  t.match(readFileSync(lockFile, 'utf8'), /other-node-7/, 'and its lock is left alone')
  // Not renewed for a minute: that host's sidecar is gone (a pod re-created after an OOM kill has a new host name).
  const lapsed = new Date(Date.now() - 60_000)
  utimesSync(lockFile, lapsed, lapsed)
  const lock = await lockStateDir(dir)
  t.teardown(lock.release)
  t.equal(lock.held, true, 'a lapsed lease is taken over')
  t.equal(lock.takenOverFrom, pid)
  t.same(readFileSync(lockFile, 'utf8').split('\n').slice(0, 2), [String(process.pid), hostname()])
})

t.test('a holder renews its lock, so another host never takes it while it runs', async (t) => {
  const dir = tempDir(t)
  const lockFile = join(dir, 'breakwater.lock')
  const lock = await lockStateDir(dir, process.pid, 'link', 20)
  t.teardown(lock.release)
  const lapsed = new Date(Date.now() - 60_000)
  utimesSync(lockFile, lapsed, lapsed)
  while (statSync(lockFile).mtimeMs < Date.now() - 30_000) await sleep(10)
  t.pass('renewed')
  await lock.release()
  t.equal(existsSync(lockFile), false, 'released')
})

t.test('the lock records the holder\'s pid and host', async (t) => {
  const dir = tempDir(t)
  const lock = await lockStateDir(dir)
  t.teardown(lock.release)
  t.same(readFileSync(join(dir, 'breakwater.lock'), 'utf8').split('\n').slice(0, 2), [String(process.pid), hostname()])
})

t.test('where the filesystem has no hard links, the lock is an exclusive create: exactly one of racing starters holds it, on a fresh dir and over a stale lock', async (t) => {
  const base = tempDir(t)
  const alone = await lockStateDir(join(base, 'alone'), process.pid, 'create')
  t.equal(alone.method, 'create', 'the lock says how it was taken')
  t.same(readFileSync(join(base, 'alone', 'breakwater.lock'), 'utf8').split('\n').slice(0, 2), [String(process.pid), hostname()], 'written whole')
  await alone.release()
  await raceRounds(t, 16, 'create', base)
})

t.test('a lock still being written (empty, or cut before its end) is its writer\'s for a few seconds, then stale', async (t) => {
  const dir = tempDir(t)
  const lockPath = join(dir, 'breakwater.lock')
  // A starter that has just created the lock, and writes it a moment later.
  writeFileSync(lockPath, '')
  const later = setTimeout(() => { writeFileSync(lockPath, `${process.pid}\n${hostname()}\n`) }, 300)
  t.teardown(() => { clearTimeout(later) })
  await t.rejects(lockStateDir(dir, deadPid(), 'create'), { name: 'StateDirLocked', message: `pid ${process.pid}` }, 'an empty lock a moment old is not taken over: the starter waits and finds it held')

  // A starter that died between creating the lock and writing it: an empty lock, old.
  writeFileSync(lockPath, `${String(process.pid).slice(0, 2)}`)
  const old = (Date.now() - 60_000) / 1000
  utimesSync(lockPath, old, old)
  const lock = await lockStateDir(dir, process.pid, 'create')
  t.ok(lock.held, 'a cut lock that old is stale and taken over')
  await lock.release()
})

t.test('a take-over guard left by a starter killed holding it is removed by one starter only: exactly one of racing starters holds the dir', async (t) => {
  const lockModule = pathToFileURL(join(ROOT, 'dist/state/lock.js')).href
  const base = tempDir(t)
  for (let round = 0; round < 16; round++) {
    const dir = join(base, `round-${round}`)
    mkdirSync(dir, { recursive: true })
    // A killed sidecar's lock, and the guard of a starter killed while taking it over.
    writeFileSync(join(dir, 'breakwater.lock'), `${deadPid()}\n${hostname()}\n`)
    const guard = join(dir, 'breakwater.lock.takeover')
    writeFileSync(guard, '')
    const old = (Date.now() - 60_000) / 1000
    utimesSync(guard, old, old)
    const { said, stop } = await race(dir, 8, lockModule, round % 2 === 0 ? 'link' : 'create')
    await stop()
    if (said.filter((s) => s === 'held').length !== 1 || said.some((s) => s !== 'held' && s !== 'locked')) {
      t.fail(`round ${round}: ${said.join(', ')}`)
      return
    }
    const left = readdirSync(dir).filter((name) => name.startsWith('breakwater.lock.takeover'))
    if (left.length > 0) {
      t.fail(`round ${round}: left ${left.join(', ')}`)
      return
    }
  }
  t.pass('one holder in every round, and no guard left')
})


/**
 * `rounds` rounds of 6 starters racing for a fresh state dir with `method`; every other round
 * starts over the lock of a killed sidecar, so the take-over is raced too. Exactly one may hold it.
 */
async function raceRounds (t: Test, rounds: number, method: 'link' | 'create', base = tempDir(t)): Promise<void> {
  const lockModule = pathToFileURL(join(ROOT, 'dist/state/lock.js')).href
  for (let round = 0; round < rounds; round++) {
    const dir = join(base, `round-${round}`)
    if (round % 2 === 1) {
      mkdirSync(dir, { recursive: true })
      writeFileSync(join(dir, 'breakwater.lock'), `${deadPid()}\n${hostname()}\n`)
    }
    const { said, stop } = await race(dir, 6, lockModule, method)
    await stop()
    if (said.filter((s) => s === 'held').length !== 1 || said.some((s) => s !== 'held' && s !== 'locked')) {
      t.fail(`round ${round}: ${said.join(', ')}`)
      return
    }
  }
  t.pass('one holder in every round')
}

/** A pid no process has now (a finished child's). */
function deadPid (): number {
  const r = spawnSync(process.execPath, ['-e', ''])
  return r.pid as number
}
