/**
 * One sidecar per state dir, with real processes: a mistaken second start on the same config
 * leaves the running sidecar's admin token alone and says who holds the dir; a lock and temp
 * files left by kill -9 do not block the next start and are cleaned.
 */
import t from 'tap'
import { readFileSync, writeFileSync, existsSync } from 'node:fs'
import { join } from 'node:path'
import { stringify } from 'yaml'
import { startUpstream } from './helpers/upstream.js'
import { startProcess, spawnCli } from './helpers/process.js'
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
  t.equal(readFileSync(lockPath, 'utf8').trim(), String(dead), 'the lock holds the owner\'s pid')
  first.child.kill('SIGKILL')
  await first.exited
  // What a kill -9 in the middle of atomic writes leaves behind.
  const leftovers = [`state.json.tmp-${dead}-3`, `state.json.tmp-${dead}-4`, `admin.token.tmp-${dead}`]
  for (const name of leftovers) writeFileSync(join(stateDir, name), '{"version": 1, "overr')
  t.ok(existsSync(lockPath), 'the killed sidecar\'s lock is still there')

  const second = await spawnCli(t, ['start', '--config', first.configPath], first.dir, first.configPath, noEnvToken)
  t.equal(second.child.exitCode, null, 'the next start runs')
  t.equal(readFileSync(lockPath, 'utf8').trim(), String(second.child.pid), 'and holds the lock')
  for (const name of leftovers) t.notOk(existsSync(join(stateDir, name)), `${name} removed`)
  const removed = second.lines.find((l) => l.event === 'state_temp_removed')
  t.same([...(removed?.files as string[] ?? [])].sort(), [...leftovers].sort(), 'and the removal is logged')
  t.ok(second.lines.some((l) => l.event === 'state_lock' && l.staleOwner === dead), 'the stale lock take-over is logged')

  second.child.kill('SIGTERM')
  t.equal(await second.exited, 0)
  t.notOk(existsSync(lockPath), 'a clean stop releases the lock')
})
