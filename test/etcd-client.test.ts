/**
 * The fleet's etcd client (src/fleet/etcd.ts) against a real etcd, through the JSON gateway it
 * speaks: exact prefixes, transactions, leases kept alive and lost, watches (history, deletes,
 * compaction), failing over between members, authentication with expiring tokens, and mutual
 * TLS — the last two also end to end, a sidecar in a fleet on such an etcd.
 */
import t, { type Test } from 'tap'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer } from 'node:net'
import { Etcd, EtcdError, type KeyValue } from '../src/fleet/etcd.js'
import { startEtcd, type EtcdCluster } from './helpers/etcd.js'
import { createPki } from './helpers/certificates.js'
import { fleetConfig } from './helpers/fleet.js'
import { startCaptured, startTestSidecar, testSidecarInput } from './helpers/sidecar.js'
import { startUpstream } from './helpers/upstream.js'
import { admin } from './helpers/admin.js'
import { eventually, send, sleep } from './helpers/http.js'
import { freePort } from '../src/fleet/local.js'
import { resolveConfig } from '../src/config/load.js'

/**
 * A client of `endpoints`. Its attempts wait up to 10 s: on a busy machine etcd's bcrypt (adding
 * a user, signing in) and a TLS handshake can take more than the fleet's 1 s, and a test that is
 * not about a member failing to answer must not fail for one answering late. The test of a
 * frozen member sets the fleet's own 1 s.
 */
function client (t: Test, endpoints: readonly string[], more: Partial<Omit<ConstructorParameters<typeof Etcd>[0], 'tls'>> & { tls?: TlsPaths } = {}): Etcd {
  const { tls, ...rest } = more
  const etcd = new Etcd({ endpoints, username: null, password: null, tls: tls === undefined ? null : pemOf(tls), attemptMs: 10_000, ...rest })
  t.teardown(async () => { await etcd.close() })
  return etcd
}

interface TlsPaths { ca: string, cert: string | null, key: string | null }

/** The files' content, as the config check hands it to the client. */
function pemOf (paths: TlsPaths): { ca: string, cert: string | null, key: string | null } {
  const read = (path: string | null): string | null => path === null ? null : readFileSync(path, 'utf8')
  return { ca: readFileSync(paths.ca, 'utf8'), cert: read(paths.cert), key: read(paths.key) }
}

/** What a call rejected with (fails the test when it did not reject). */
async function rejection (t: Test, p: Promise<unknown>): Promise<EtcdError> {
  try {
    await p
  } catch (err) {
    t.type(err, EtcdError, 'an EtcdError')
    return err as EtcdError
  }
  t.fail('expected a rejection')
  return new EtcdError('none', false)
}

/** Enable authentication with a root user (etcd needs one before it enables it). */
async function enableAuth (etcd: Etcd): Promise<void> {
  // etcd 3.4 hashes a new user's password while it applies the add: at a high bcrypt cost on a
  // busy host, the call can outlast etcd's request timeout (UNAVAILABLE) and land all the same.
  // Adding it again would queue one more hash behind the first; wait for the first to land.
  try {
    await etcd.call('/v3/auth/user/add', { name: 'root', password: 'root-password' })
  } catch (err) {
    if (!(err instanceof EtcdError && err.recoverable)) throw err
    const added = async (): Promise<boolean> => await etcd.call('/v3/auth/user/get', { name: 'root' }).then(() => true, () => false)
    if (!await eventually(added, 180_000, 500)) throw err
  }
  await etcd.call('/v3/auth/user/grant', { user: 'root', role: 'root' })
  await etcd.call('/v3/auth/enable', {})
}

t.test('a port laid out for a later etcd start is free and outside the kernel\'s ephemeral range, where no outgoing connection takes it', async (t) => {
  const [low] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number) as [number]
  t.ok(low - 10_000 >= 1000, `this host leaves room below its ephemeral range (it starts at ${low})`)
  for (let i = 0; i < 20; i++) {
    const port = await freePort()
    t.ok(port >= 10_000 && port < low, `${port} is below ${low}`)
    const server = createServer()
    await new Promise<void>((resolve, reject) => { server.once('error', reject); server.listen(port, '127.0.0.1', resolve) })
    await new Promise<void>((resolve) => { server.close(() => { resolve() }) })
  }
})

t.test('put and range: a prefix reads exactly its keys, values round-trip as written', async (t) => {
  const cluster = await startEtcd(t)
  const etcd = client(t, cluster.endpoints)
  const value = JSON.stringify({ reason: 'naïve café — ✓', n: 1 })
  const r1 = await etcd.put('/bw/shop/flags/a', value)
  await etcd.put('/bw/shop/flags/b', 'two')
  await etcd.put('/bw/shop0', 'just past the prefix')
  await etcd.put('/bw/shopx/flags/a', 'another service')
  await etcd.put('/bw/shoo', 'just before it')
  t.ok(r1 > 0, 'a put says its revision')
  const all = await etcd.range('/bw/shop/', true)
  t.same(all.kvs.map((kv) => kv.key), ['/bw/shop/flags/a', '/bw/shop/flags/b'], 'only the keys under the prefix')
  t.equal(all.kvs[0]?.value, value, 'the value as written, UTF-8 included')
  t.equal(all.revision, r1 + 4, 'read at the newest revision')
  t.equal(all.kvs[0]?.modRevision, r1)
  const one = await etcd.range('/bw/shop/flags/b')
  t.same(one.kvs.map((kv) => kv.value), ['two'])
  t.same((await etcd.range('/bw/none')).kvs, [], 'an absent key reads as none')
  t.same((await etcd.range('/bw/none/', true)).kvs, [], 'an empty prefix too')
})

t.test('transactions: create only if absent, compare by revision and by value', async (t) => {
  const cluster = await startEtcd(t)
  const etcd = client(t, cluster.endpoints)
  const key = '/bw/shop/incidents/x'
  const first = await etcd.txn([{ key, target: 'CREATE', createRevision: 0 }], [{ key, value: 'mine' }], key)
  t.equal(first.succeeded, true, 'created')
  t.same(first.kvs, [])
  const second = await etcd.txn([{ key, target: 'CREATE', createRevision: 0 }], [{ key, value: 'yours' }], key)
  t.equal(second.succeeded, false, 'a second create loses')
  t.equal(second.kvs[0]?.value, 'mine', 'and reads who holds it')
  t.equal(second.kvs[0]?.modRevision, first.revision)
  t.equal((await etcd.txn([{ key, target: 'MOD', modRevision: first.revision - 1 }], [{ key, value: 'stale' }])).succeeded, false, 'an older revision does not match')
  const mod = await etcd.txn([{ key, target: 'MOD', modRevision: first.revision }], [{ key, value: 'moved' }])
  t.equal(mod.succeeded, true, 'the current revision matches')
  t.equal((await etcd.txn([{ key, target: 'VALUE', value: 'mine' }], [{ key, value: 'x' }])).succeeded, false, 'an old value does not match')
  t.equal((await etcd.txn([{ key, target: 'VALUE', value: 'moved' }], [{ key, value: 'done' }])).succeeded, true, 'the current value matches')
  t.equal((await etcd.range(key)).kvs[0]?.value, 'done')
})

t.test('leases: kept alive past their ttl, gone with revoke, and lost when etcd drops them', async (t) => {
  const cluster = await startEtcd(t)
  const etcd = client(t, cluster.endpoints)
  const lost: string[] = []
  const lease = etcd.lease(2, (err) => { lost.push(err.message) })
  const id = await lease.grant()
  t.match(id, /^\d+$/, 'a decimal lease id')
  t.equal(await lease.grant(), id, 'granted once')
  await etcd.put('/bw/held', 'x', id)
  t.equal((await etcd.range('/bw/held')).kvs[0]?.lease, id, 'the key is under the lease')
  await sleep(4500)
  t.equal((await etcd.range('/bw/held')).kvs.length, 1, 'still there after twice the ttl: kept alive')
  t.same(lost, [])
  await lease.revoke()
  t.equal(lease.revoked(), true)
  t.equal((await etcd.range('/bw/held')).kvs.length, 0, 'revoking deletes its keys')

  // Another client revokes a lease (as an operator could): its keeper learns it is gone.
  const other = etcd.lease(2, (err) => { lost.push(err.message) })
  const otherId = await other.grant()
  await etcd.call('/v3/lease/revoke', { ID: otherId })
  t.ok(await eventually(() => lost.length === 1, 10_000), 'lost, at the next keepalive')
  t.match(lost[0], /expired/)
  t.equal(other.revoked(), true, 'and a new lease is needed')

  // A put under a lease etcd does not know is refused, and retrying would not help.
  const err = await rejection(t, etcd.put('/bw/x', 'y', '12345'))
  t.match(err.message, /lease not found/)
  t.equal(err.recoverable, false)
})

t.test('watch: history from a revision, puts and deletes in order; a compacted start revision ends it', async (t) => {
  const cluster = await startEtcd(t)
  const etcd = client(t, cluster.endpoints)
  const start = await etcd.put('/bw/shop/flags/a', '1')
  await etcd.put('/bw/other', 'not watched')
  const seen: Array<[string, string, boolean, number]> = []
  const ends: string[] = []
  const watch = await etcd.watch('/bw/shop/', start, {
    event: (kv: KeyValue, deleted) => { seen.push([kv.key, kv.value, deleted, kv.modRevision]) },
    end: (why) => { ends.push(why) }
  })
  await etcd.put('/bw/shop/flags/b', '2')
  await etcd.call('/v3/kv/deleterange', { key: Buffer.from('/bw/shop/flags/a').toString('base64') })
  t.ok(await eventually(() => seen.length === 3, 5000), 'three events')
  t.same(seen.map(([k, v, d]) => [k, v, d]), [['/bw/shop/flags/a', '1', false], ['/bw/shop/flags/b', '2', false], ['/bw/shop/flags/a', '', true]], 'from the start revision, in order, the delete as a delete')
  t.ok(seen.every(([, , , r], i) => i === 0 || r > (seen[i - 1]?.[3] ?? 0)), 'revisions rising')
  watch.cancel()
  await sleep(200)
  t.same(ends, [], 'a cancel is not an end')

  const newest = await etcd.put('/bw/shop/flags/c', '3')
  await etcd.call('/v3/kv/compaction', { revision: String(newest), physical: true })
  const compacted: string[] = []
  await etcd.watch('/bw/shop/', start, { event: () => {}, end: (why) => { compacted.push(why) } })
  t.ok(await eventually(() => compacted.length === 1, 5000), 'ended')
  t.match(compacted[0], /compacted/, 'saying the start revision was compacted (the fleet then reads the prefix again)')
})

/** The index of a member that is not the cluster's leader (etcd's maintenance status). */
async function followerOf (cluster: EtcdCluster): Promise<number> {
  for (let i = 0; i < cluster.endpoints.length; i++) {
    const status = (await send(cluster.endpoints[i] as string, '/v3/maintenance/status', { method: 'POST', body: '{}' })).json<{ header: { member_id: string }, leader: string }>()
    if (status.leader !== status.header.member_id) return i
  }
  throw new Error('every member says it leads')
}

t.test('members: a dead or frozen member is passed over; one etcd refusing is not retried elsewhere', async (t) => {
  const cluster = await startEtcd(t, 3)
  const dead = `http://127.0.0.1:${await freePort()}`
  const etcd = client(t, [dead, ...cluster.endpoints])
  t.ok(await etcd.put('/bw/k', 'v') > 0, 'a refused connection: the next member answers')
  const watched: string[] = []
  const watch = await etcd.watch('/bw/', 1, { event: (kv) => { watched.push(kv.key) }, end: () => {} })
  t.ok(await eventually(() => watched.includes('/bw/k'), 5000), 'a watch too')
  watch.cancel()

  // A frozen member holds the connection and answers nothing: after attemptMs the next one is asked.
  // The frozen one is a follower: with the leader frozen, no member answers until an election.
  const follower = await followerOf(cluster)
  const frozen = client(t, [cluster.endpoints[follower] as string, ...cluster.endpoints.filter((_, i) => i !== follower)], { attemptMs: 1000 })
  t.equal((await frozen.range('/bw/k')).kvs.length, 1)
  cluster.pause(follower)
  t.teardown(() => { cluster.resume(follower) })
  t.equal((await frozen.range('/bw/k')).kvs[0]?.value, 'v', 'read through another member')
  cluster.resume(follower)

  const alone = client(t, [dead])
  const err = await rejection(t, alone.range('/bw/k'))
  t.equal(err.recoverable, true, 'nothing answering: worth retrying later')
})

t.test('authentication: a token per client, renewed when etcd forgets it; a wrong password is a clear error', async (t) => {
  // Tokens that expire after 1 s idle: every call after a pause needs a new one.
  const cluster = await startEtcd(t, 1, { args: ['--auth-token', 'simple', '--auth-token-ttl', '1'] })
  await enableAuth(client(t, cluster.endpoints))
  const etcd = client(t, cluster.endpoints, { username: 'root', password: 'root-password' })
  await etcd.put('/bw/a', '1')
  t.equal((await etcd.range('/bw/a')).kvs[0]?.value, '1', 'signed in')
  await sleep(3000)
  t.equal((await etcd.range('/bw/a')).kvs[0]?.value, '1', 'the token expired; the client signed in again')
  const events: string[] = []
  const watch = await etcd.watch('/bw/', 1, { event: (kv) => { events.push(kv.value) }, end: () => {} })
  t.ok(await eventually(() => events.includes('1'), 5000), 'a watch with a token')
  watch.cancel()

  const wrong = await rejection(t, client(t, cluster.endpoints, { username: 'root', password: 'nope' }).range('/bw/a'))
  t.match(wrong.message, /authentication failed/)
  t.equal(wrong.recoverable, false, 'not retried as if etcd were away')
  const anonymous = await rejection(t, client(t, cluster.endpoints).range('/bw/a'))
  t.match(anonymous.message, /user name is empty|permission denied|not authorized/i, 'no credentials: refused, saying why')
})

t.test('a sign-in slower than an attempt (etcd\'s bcrypt on a busy CPU) is not charged to the call: the put and the watch go through', async (t) => {
  // bcrypt cost 15: etcd spends seconds checking the password, on any machine — longer than the
  // fleet's 1 s attempt, as cost 10 can on a CPU-throttled etcd. A longer election timeout gives
  // etcd's own request timeout (5 s + two election timeouts) room for adding the user, which
  // hashes at that cost too, on a loaded machine.
  const cluster = await startEtcd(t, 1, { args: ['--bcrypt-cost', '15', '--heartbeat-interval', '500', '--election-timeout', '5000'] })
  const setup = client(t, cluster.endpoints, { attemptMs: 60_000 })
  await enableAuth(setup)
  const signInMs = 60_000
  const etcd = client(t, cluster.endpoints, { username: 'root', password: 'root-password', attemptMs: 1000, signInMs })
  t.ok(await etcd.put('/bw/slow', 'signed in') > 0, 'the put needing a sign-in succeeds with a 1 s attempt')
  const watcher = client(t, cluster.endpoints, { username: 'root', password: 'root-password', attemptMs: 1000, signInMs })
  const events: string[] = []
  const watch = await watcher.watch('/bw/', 1, { event: (kv) => { events.push(kv.value) }, end: () => {} })
  t.teardown(() => { watch.cancel() })
  t.ok(await eventually(() => events.includes('signed in'), 10_000), 'so does a watch needing one')
})

t.test('mutual TLS: the client presents its certificate and checks etcd\'s against the CA', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('etcd', 1, 'both')
  const clientCert = pki.issue('sidecar', 2, 'client')
  const cluster = await startEtcd(t, 1, { tls: { ...server, ca: pki.ca } })
  t.match(cluster.endpoints[0], /^https:/)
  const etcd = client(t, cluster.endpoints, { tls: { ca: pki.ca, ...clientCert } })
  t.ok(await etcd.put('/bw/tls', 'yes') > 0, 'put over mutual TLS')
  t.equal((await etcd.range('/bw/tls')).kvs[0]?.value, 'yes')

  const noCert = await rejection(t, client(t, cluster.endpoints, { tls: { ca: pki.ca, cert: null, key: null } }).range('/bw/tls'))
  t.ok(noCert.message.length > 0, `without a client certificate: refused (${noCert.message})`)
  const otherPki = createPki(t, 'Other CA')
  const untrusted = await rejection(t, client(t, cluster.endpoints, { tls: { ca: otherPki.ca, ...clientCert } }).range('/bw/tls'))
  t.equal(untrusted.recoverable, false, `a server certificate the CA did not sign is not retried (${untrusted.message})`)
})

t.test('fleet.etcd.tls files are read once, by the config check: the etcd client uses what was checked, not the files as they are later', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('etcd', 1, 'both')
  const clientCert = pki.issue('sidecar', 2, 'client')
  const cluster = await startEtcd(t, 1, { tls: { ...server, ca: pki.ca } })
  const up = await startUpstream()
  t.teardown(up.close)
  const input = fleetConfig(up.url, cluster.endpoints)
  const fleet = input.fleet as { etcd: Record<string, unknown> }
  fleet.etcd = { ...fleet.etcd, tls: { ca: pki.ca, ...clientCert } }
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-test-'))
  t.teardown(() => rmSync(stateDir, { recursive: true, force: true }))
  const { config } = resolveConfig(testSidecarInput(input, stateDir))
  // Checked, then gone before the start (a Secret volume's swap half done, a file moved): what
  // was checked is what the client presents; a second read could find nothing, or other files.
  for (const path of [pki.ca, clientCert.cert, clientCert.key]) rmSync(path)
  const a = await startCaptured(t, config, stateDir, { instance: 'a' })
  t.ok(await eventually(() => a.sidecar.fleet?.connected === true, 20_000), 'connected over mutual TLS with the files as checked')
  const res = await admin(a.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
})

t.test('a fleet on an etcd with authentication and mutual TLS: the sidecar connects and applies fleet writes', async (t) => {
  const pki = createPki(t)
  const server = pki.issue('etcd', 1, 'both')
  // etcd's gateway refuses a client certificate with a CommonName once authentication is on
  // ("CommonName of client sending a request against gateway will be ignored"): none here.
  const clientCert = pki.issue('sidecar', 2, 'client', '/O=breakwater')
  const withCn = pki.issue('sidecar-cn', 3, 'client')
  const cluster: EtcdCluster = await startEtcd(t, 1, { tls: { ...server, ca: pki.ca } })
  const tls = { ca: pki.ca, ...clientCert }
  await enableAuth(client(t, cluster.endpoints, { tls }))
  const up = await startUpstream()
  t.teardown(up.close)
  const config = fleetConfig(up.url, cluster.endpoints)
  const fleet = config.fleet as { etcd: Record<string, unknown> }
  fleet.etcd = { ...fleet.etcd, username: 'root', password: 'root-password', tls }
  const a = await startTestSidecar(t, config, { instance: 'a' })
  const b = await startTestSidecar(t, config, { instance: 'b' })
  t.ok(await eventually(() => a.sidecar.fleet?.connected === true && b.sidecar.fleet?.connected === true, 20_000), 'both connected')
  const res = await admin(a.admin, 'PUT', '/v1/flags/newCheckout', { enabled: false, reason: 'bad release', scope: 'fleet' })
  t.equal(res.status, 200, JSON.stringify(res.body))
  t.ok(await eventually(async () => (await send(b.proxy, '/checkout/pay')).status === 503, 10_000), 'the other sidecar applied it')
  const stored = await client(t, cluster.endpoints, { tls, username: 'root', password: 'root-password' }).range('/bw-test/shop/flags/newCheckout')
  t.equal(JSON.parse(stored.kvs[0]?.value ?? '{}').value, false, 'written to etcd')

  // A client certificate with a CommonName: etcd's refusal is passed on as it says it.
  const cn = await rejection(t, client(t, cluster.endpoints, { tls: { ca: pki.ca, ...withCn }, username: 'root', password: 'root-password' }).range('/bw/x'))
  t.match(cn.message, /CommonName/, `etcd's words (${cn.message})`)

  // The same sidecar with a wrong password stays disconnected and says why, once.
  fleet.etcd = { ...fleet.etcd, password: 'wrong' }
  const c = await startTestSidecar(t, config, { instance: 'c' })
  t.ok(await eventually(() => c.logs.some((l) => l.event === 'fleet' && l.connected === false), 10_000), 'a line saying it is unreachable')
  const line = c.logs.find((l) => l.event === 'fleet' && l.connected === false)
  t.match(line?.error, /authentication failed/, 'naming the reason')
  t.equal(c.sidecar.fleet?.connected, false)
})

/** A port on 127.0.0.1 that takes connections and never answers (a frozen host, a black hole). */
async function blackHole (t: Test): Promise<string> {
  const sockets = new Set<import('node:net').Socket>()
  const server = createServer((socket) => { sockets.add(socket); socket.on('error', () => {}) })
  await new Promise<void>((resolve) => { server.listen(0, '127.0.0.1', resolve) })
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => { server.close(() => { resolve() }) })
  })
  return `http://127.0.0.1:${(server.address() as import('node:net').AddressInfo).port}`
}

t.test('members all failing: a member\'s own answer is reported over a silent member, and a silent member over one refusing connections', async (t) => {
  // One member of three left alone: it answers, saying it has no leader.
  const cluster = await startEtcd(t, 3)
  await cluster.kill(1)
  await cluster.kill(2)
  const alone = cluster.endpoints[0] as string
  const silent = await blackHole(t)
  const closed = `http://127.0.0.1:${await freePort()}`
  const failing = async (endpoints: string[]): Promise<{ call: EtcdError, watch: EtcdError }> => {
    // A silent member is given up on after attemptMs: this test is about which error is reported.
    const etcd = client(t, endpoints, { attemptMs: 1000 })
    const call = await rejection(t, etcd.put('/bw/k', 'v'))
    const watch = await rejection(t, etcd.watch('/bw/', 1, { event: () => {}, end: () => {} }))
    return { call, watch }
  }
  // Once its election timeout has passed without a leader.
  const lone = client(t, [alone])
  t.ok(await eventually(async () => await lone.put('/bw/k', 'v').then(() => false, (err: Error) => err.message.includes('no leader')), 20_000), 'the lone member says it has no leader')

  for (const order of [[alone, silent, closed], [closed, silent, alone], [silent, alone, closed]]) {
    const { call, watch } = await failing(order)
    for (const [what, err] of [['a call', call], ['a watch', watch]] as const) {
      t.match(err.message, /no leader/, `${what}: the member's answer, whatever the order (${err.message})`)
      t.equal(err.answered, true)
      t.equal(err.recoverable, true, 'worth retrying: an election may end it')
    }
  }
  for (const order of [[silent, closed], [closed, silent]]) {
    const { call, watch } = await failing(order)
    for (const [what, err] of [['a call', call], ['a watch', watch]] as const) {
      t.match(err.message, /no answer within 1000 ms/, `${what}: the member that took the connection and said nothing (${err.message})`)
      t.equal(err.silent, true)
      t.equal(err.recoverable, true)
    }
  }
  const { call, watch } = await failing([closed])
  for (const err of [call, watch]) {
    t.match(err.message, /ECONNREFUSED|connect/i, `nothing but a refusal: the refusal (${err.message})`)
    t.equal(err.answered || err.silent, false)
    t.equal(err.recoverable, true)
  }
})
