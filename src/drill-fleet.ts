/**
 * The fleet drill (`breakwater drill --fleet N`): on loopback, a 3-member etcd cluster, N
 * sidecars of one service, Alertmanager routing to a webhook receiver, and a bad release. It
 * prints how fast a fleet kill switch reaches all N sidecars (p50, p99, max), kills one etcd
 * member and shows nothing changed, then counts — for one incident fired by every sidecar —
 * rollback calls, Alertmanager notifications and Slack/PagerDuty-style deliveries, and the
 * fleet's time to restore. Exit 0 when the incident was handled once and service restored.
 */
import http from 'node:http'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { Pool } from 'undici'
import { resolveConfig } from './config/load.js'
import { startSidecar, type Sidecar } from './sidecar.js'
import { startDemo, demoService } from './drill.js'
import { startLocalAlertmanager, startLocalEtcd, type LocalAlertmanager, type LocalEtcd } from './fleet/local.js'

export interface FleetDrillOptions {
  out: (text: string) => void
  /** Sidecars in the fleet (default 20). */
  sidecars?: number
  /** Give up on restoration after this many seconds. */
  timeoutSeconds?: number
}

export interface FleetDrillResult {
  propagation: { p50Ms: number, p99Ms: number, maxMs: number, reached: number }
  /** Sidecars still connected to etcd after one member was killed. */
  connectedAfterMemberLoss: number
  rollbackCalls: number
  alertmanagerNotifications: number
  deliveries: number
  restored: boolean
  timeToRestoreSeconds: number | null
}

const TOKEN = 'drill-token-0123456789abcdef'

/** A local HTTP endpoint that counts what is POSTed to it, by path. */
async function startCounter (): Promise<{ url: string, bodies: Map<string, unknown[]>, close: () => Promise<void> }> {
  const bodies = new Map<string, unknown[]>()
  const server = http.createServer((req, res) => {
    let text = ''
    req.on('data', (c: Buffer) => { text += c.toString('utf8') })
    req.on('end', () => {
      let body: unknown = text
      try { body = JSON.parse(text) } catch { /* kept as text */ }
      const list = bodies.get(req.url ?? '') ?? []
      list.push(body)
      bodies.set(req.url ?? '', list)
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end('{"ok":true}')
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    bodies,
    close: async () => { server.closeAllConnections(); await new Promise<void>((resolve) => server.close(() => resolve())) }
  }
}

function quantile (sorted: number[], q: number): number {
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] as number
}

async function waitUntil (check: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  return true
}

export async function runFleetDrill (o: FleetDrillOptions): Promise<FleetDrillResult> {
  const n = o.sidecars ?? 20
  const timeout = (o.timeoutSeconds ?? 60) * 1000
  const root = mkdtempSync(join(tmpdir(), 'breakwater-fleet-drill-'))
  const demo = await startDemo()
  const counter = await startCounter()
  let etcd: LocalEtcd | null = null
  let am: LocalAlertmanager | null = null
  const sidecars: Sidecar[] = []
  let load: NodeJS.Timeout | null = null
  const pools: Pool[] = []
  try {
    o.out(`Breakwater fleet drill: ${n} sidecars of service "shop", a 3-member etcd cluster, Alertmanager\n`)
    etcd = await startLocalEtcd(3)
    am = await startLocalAlertmanager(`${counter.url}/alertmanager`, { group_wait: '2s', group_interval: '5s' })
    o.out(`  etcd ${etcd.endpoints.join(', ')}\n  alertmanager ${am.url}\n`)
    for (let i = 0; i < n; i++) {
      const { config } = resolveConfig({
        ...demoService(demo, '3s', 10),
        stateDir: join(root, `s${i}`),
        listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
        upstreams: { app: { url: demo.url } },
        verification: { windowMs: '2s', timeoutMs: '30s' },
        notifications: { webhooks: [`${counter.url}/pager`], alertmanager: { urls: [am.url], repeatInterval: '2s' } },
        fleet: { etcd: { endpoints: etcd.endpoints, prefix: '/breakwater-drill' }, leaseTtl: '3s' },
        logging: { level: 'silent' },
        shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
      })
      sidecars.push(await startSidecar(config, { adminToken: TOKEN, instance: `sidecar-${i}` }))
    }
    await waitUntil(() => sidecars.every((s) => s.fleet?.connected === true), 30_000)
    o.out(`  ${sidecars.filter((s) => s.fleet?.connected === true).length}/${n} sidecars connected to etcd\n\n`)

    // 1. A fleet kill switch: one command, every sidecar.
    const started = Date.now()
    const put = fetch(`${sidecars[0]?.addresses.admin ?? ''}/v1/flags/newCheckout`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ enabled: false, reason: 'drill: fleet kill switch', scope: 'fleet' })
    })
    const seen = new Array<number | null>(n).fill(null)
    await waitUntil(() => {
      const now = Date.now()
      sidecars.forEach((s, i) => { if (seen[i] === null && !s.flags.enabled('newCheckout')) seen[i] = now - started })
      return seen.every((x) => x !== null)
    }, 10_000)
    const res = await put
    await res.body?.cancel()
    const times = seen.filter((x): x is number => x !== null).sort((a, b) => a - b)
    const propagation = { p50Ms: quantile(times, 0.5), p99Ms: quantile(times, 0.99), maxMs: times.at(-1) ?? 0, reached: times.length }
    o.out(`Fleet kill switch (kill newCheckout --fleet): in force on ${propagation.reached}/${n} sidecars\n`)
    o.out(`  propagation p50 ${propagation.p50Ms} ms, p99 ${propagation.p99Ms} ms, max ${propagation.maxMs} ms (target p99 <= 1000 ms)\n`)
    await fetch(`${sidecars[1]?.addresses.admin ?? ''}/v1/flags/newCheckout`, {
      method: 'DELETE',
      headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ reason: 'drill: restore', scope: 'fleet' })
    }).then(async (r) => { await r.body?.cancel() })
    await waitUntil(() => sidecars.every((s) => s.flags.enabled('newCheckout')), 10_000)

    // 2. One etcd member dies: nothing changes.
    await etcd.kill(2)
    await new Promise((resolve) => setTimeout(resolve, 3000))
    const connectedAfterMemberLoss = sidecars.filter((s) => s.fleet?.connected === true).length
    o.out(`\nKilled etcd member m2: ${connectedAfterMemberLoss}/${n} sidecars still connected, fleet state unchanged\n`)

    // 3. A bad release: every sidecar sees it and fires.
    for (const s of sidecars) pools.push(new Pool(s.addresses.proxy, { connections: 2 }))
    load = setInterval(() => {
      for (const p of pools) {
        for (const path of ['/checkout/cart', '/catalog/items']) p.request({ path, method: 'GET' }).then(async (r) => { await r.body.dump() }, () => {})
      }
    }, 50)
    await new Promise((resolve) => setTimeout(resolve, 1000))
    const onset = Date.now()
    demo.bad = true
    o.out('\nBad release of /checkout: half of its requests fail on every sidecar\n')
    const leader = (): Sidecar | undefined => sidecars.find((s) => s.verifier.incidents.some((i) => i.fleet?.role === 'leader' && i.restoredAt !== null))
    await waitUntil(() => leader() !== undefined, timeout)
    const incident = leader()?.verifier.incidents.find((i) => i.fleet?.role === 'leader')
    const restored = incident?.status === 'restored'
    const timeToRestoreSeconds = incident?.restoredAt == null ? null : (Date.parse(incident.restoredAt) - onset) / 1000
    // Every sidecar resolves its alert (verified, or its trigger re-armed); Alertmanager says so once.
    type Notification = { status: string, alerts: Array<{ labels: Record<string, string> }> }
    const notifications = (): Notification[] => (counter.bodies.get('/alertmanager') ?? []) as Notification[]
    await waitUntil(() => notifications().some((x) => x.status === 'resolved'), timeout)
    const all = notifications()
    const firing = all.filter((x) => x.status === 'firing')
    const result: FleetDrillResult = {
      propagation,
      connectedAfterMemberLoss,
      rollbackCalls: demo.rollbacks,
      alertmanagerNotifications: firing.length,
      deliveries: ((counter.bodies.get('/pager') ?? []) as Array<{ trigger?: string | null }>).filter((d) => d.trigger === 'error_rate_5pct').length,
      restored,
      timeToRestoreSeconds
    }
    const followers = sidecars.filter((s) => s.verifier.incidents.some((i) => i.fleet?.role === 'follower')).length
    o.out(`  incident leader: ${incident?.fleet?.leader ?? 'none'}; ${followers} followers\n`)
    o.out(`  rollback calls: ${result.rollbackCalls} (target 1)\n`)
    o.out(`  Alertmanager notifications while firing: ${result.alertmanagerNotifications} (target 1; ${firing[0]?.alerts.length ?? 0} alerts grouped), then ${all.length - firing.length} resolved\n`)
    o.out(`  Slack/PagerDuty/webhook deliveries: ${result.deliveries} per channel for the incident (fired, rolled back, restored), all from the leader\n`)
    o.out(restored ? `\nFleet restored ${timeToRestoreSeconds?.toFixed(1) ?? '?'} s after the bad release (target: under 10 s).\n` : '\nService was NOT restored.\n')
    return result
  } finally {
    if (load !== null) clearInterval(load)
    await Promise.all(pools.map(async (p) => { await p.close().catch(() => {}) }))
    await Promise.all(sidecars.map(async (s) => { await s.close().catch(() => {}) }))
    await am?.close()
    await etcd?.close()
    await counter.close()
    await demo.close()
    rmSync(root, { recursive: true, force: true })
  }
}
