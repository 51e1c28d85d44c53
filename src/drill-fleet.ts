/**
 * The fleet drill (`breakwater drill --fleet N`): on loopback, a 3-member etcd cluster, N
 * sidecars of one service, Alertmanager routing to a webhook receiver, and a bad release whose
 * rollback takes 3 s to deploy. It prints how fast a fleet kill switch reaches all N sidecars
 * (p50, p99, max) — from the admin API request, and from a spawned `breakwater kill --fleet` —
 * kills one etcd member and shows nothing changed, then counts, for one incident fired by every
 * sidecar, rollback calls, Alertmanager notifications and the deliveries to local Slack-,
 * PagerDuty- and webhook-shaped receivers (the sidecars' real Slack, PagerDuty Events v2 and
 * webhook channels), and the fleet's time to restore. Exit 0 only when the kill switch reached
 * every sidecar, the incident made exactly one rollback call, one Alertmanager notification
 * while firing and the expected deliveries, all from its leader, and service was restored.
 */
import http from 'node:http'
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { AddressInfo } from 'node:net'
import { Pool } from './undici.js'
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
  /**
   * The `breakwater` command (`[node, script]`) and its environment: when given, the fleet
   * kill switch is also timed from a spawned `breakwater kill --fleet`.
   */
  command?: { argv: readonly string[], env: NodeJS.ProcessEnv }
  /** Stop at the next step (the reader of the output went away): everything started is closed, then it rejects. */
  signal?: AbortSignal
}

/** How long a fleet kill switch took to be in force on each sidecar, from the command. */
export interface Propagation { p50Ms: number, p99Ms: number, maxMs: number, reached: number }

/** Deliveries for the drill's incident, by notification channel. */
export interface Deliveries { slack: number, pagerduty: number, webhook: number }

/**
 * What each channel receives for one incident that is rolled back and verified restored, sent
 * once for the fleet: Slack and the webhook hear of the trigger firing, the rollback and the
 * restoration; PagerDuty gets its `trigger` and `resolve` events.
 */
export const EXPECTED_DELIVERIES: Readonly<Deliveries> = { slack: 3, pagerduty: 2, webhook: 3 }

export interface FleetDrillResult {
  /** From the admin API request (`PUT /v1/flags/newCheckout`, `"scope": "fleet"`). */
  propagation: Propagation
  /** From a spawned `breakwater kill newCheckout --fleet`; null without `command`. */
  cliPropagation: Propagation | null
  /** Sidecars still connected to etcd after one member was killed. */
  connectedAfterMemberLoss: number
  rollbackCalls: number
  /** Alertmanager's notifications for the incident while it fired. */
  alertmanagerNotifications: number
  deliveries: Deliveries
  /** Slack, PagerDuty and webhook deliveries made during the incident by sidecars other than its leader. */
  followerDeliveries: number
  restored: boolean
  timeToRestoreSeconds: number | null
  /** Why the drill failed; empty when every count is as expected and service was restored. */
  failures: string[]
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

/**
 * Start a fleet kill switch with `issue` and time it: per sidecar, from the moment `issue` is
 * called until the sidecar's snapshot says newCheckout is off. Resolves once `issue` is done
 * too (it throws when the command failed).
 */
async function timeKillSwitch (sidecars: Sidecar[], issue: () => Promise<void>): Promise<Propagation> {
  const started = Date.now()
  const done = issue()
  const seen = new Array<number | null>(sidecars.length).fill(null)
  await Promise.race([
    waitUntil(() => {
      const now = Date.now()
      sidecars.forEach((s, i) => { if (seen[i] === null && !s.flags.enabled('newCheckout')) seen[i] = now - started })
      return seen.every((x) => x !== null)
    }, 10_000),
    // A command that failed ends the wait at once.
    done.then(async () => await new Promise(() => {}), () => {})
  ])
  await done
  const times = seen.filter((x): x is number => x !== null).sort((a, b) => a - b)
  return { p50Ms: quantile(times, 0.5), p99Ms: quantile(times, 0.99), maxMs: times.at(-1) ?? 0, reached: times.length }
}

/** Run `argv` to completion; rejects with its stderr unless it exits 0. */
async function run (argv: readonly string[], args: string[], env: NodeJS.ProcessEnv, cwd: string): Promise<void> {
  const child = spawn(argv[0] as string, [...argv.slice(1), ...args], { cwd, env, stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString('utf8') })
  const code = await new Promise<number | null>((resolve, reject) => { child.on('error', reject); child.on('close', resolve) })
  if (code !== 0) throw new Error(`breakwater ${args.join(' ')} exited ${String(code)}: ${stderr.trim()}`)
}

const TRIGGER = 'error_rate_5pct'
/** How long the demo's rollback takes to deploy: longer than Alertmanager's group_wait, as real deploys are. */
const DEPLOY_MS = 3000
const CHANNELS = ['slack', 'pagerduty', 'webhook'] as const

/**
 * Messages each channel's receivers got for the drill's incident (operators' actions have no
 * trigger), from the sidecars `from` picks: each sidecar posts to `/{channel}/{instance}`.
 */
function deliveredFor (bodies: Map<string, unknown[]>, from: (instance: string) => boolean): Deliveries {
  const at = (channel: string): Array<Record<string, any>> => [...bodies].flatMap(([path, list]) => {
    const [, c, instance] = path.split('/')
    return c === channel.slice(1) && instance !== undefined && from(instance) ? list as Array<Record<string, any>> : []
  })
  return {
    // The Slack message's last block: `<event> · trigger <name> · <time>`.
    slack: at('/slack').filter((m) => JSON.stringify(m.blocks?.at(-1) ?? null).includes(`trigger ${TRIGGER}`)).length,
    pagerduty: at('/pagerduty').filter((e) => e.payload?.class === TRIGGER).length,
    webhook: at('/webhook').filter((w) => w.trigger === TRIGGER).length
  }
}

function propagationLine (p: Propagation): string {
  return `propagation p50 ${p.p50Ms} ms, p99 ${p.p99Ms} ms, max ${p.maxMs} ms`
}

export async function runFleetDrill (o: FleetDrillOptions): Promise<FleetDrillResult> {
  const n = o.sidecars ?? 20
  const timeout = (o.timeoutSeconds ?? 60) * 1000
  const root = mkdtempSync(join(tmpdir(), 'breakwater-fleet-drill-'))
  // Not fixed by the rollback call itself: the drill deploys the previous release DEPLOY_MS later.
  const demo = await startDemo(false)
  const counter = await startCounter()
  let etcd: LocalEtcd | null = null
  let am: LocalAlertmanager | null = null
  const sidecars: Sidecar[] = []
  let load: NodeJS.Timeout | null = null
  const pools: Pool[] = []
  const failures: string[] = []
  const step = (): void => { o.signal?.throwIfAborted() }
  try {
    o.out(`Breakwater fleet drill: ${n} sidecars of service "shop", a 3-member etcd cluster, Alertmanager\n`)
    etcd = await startLocalEtcd(3)
    // group_interval outlasts the followers' alerts (each resolves when its trigger re-arms,
    // a window after the fix), so the group's next notification is the resolved one.
    am = await startLocalAlertmanager(`${counter.url}/alertmanager`, { group_wait: '2s', group_interval: '10s' })
    o.out(`  etcd ${etcd.endpoints.join(', ')}\n  alertmanager ${am.url}\n`)
    o.out(`  Slack, PagerDuty and webhook receivers ${counter.url}/slack, /pagerduty, /webhook\n`)
    for (let i = 0; i < n; i++) {
      step()
      const instance = `sidecar-${i}`
      const { config } = resolveConfig({
        ...demoService(demo, '3s', 10),
        stateDir: join(root, `s${i}`),
        listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
        upstreams: { app: { url: demo.url } },
        verification: { windowMs: '2s', timeoutMs: '30s' },
        notifications: {
          slackWebhookUrl: `${counter.url}/slack/${instance}`,
          slackChannel: '#shop-incidents',
          pagerDutyUrl: `${counter.url}/pagerduty/${instance}`,
          pagerDutyRoutingKey: 'drill-routing-key',
          webhooks: [`${counter.url}/webhook/${instance}`],
          alertmanager: { urls: [am.url], repeatInterval: '2s' }
        },
        fleet: { etcd: { endpoints: etcd.endpoints, prefix: '/breakwater-drill' }, leaseTtl: '3s' },
        logging: { level: 'silent' },
        shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
      })
      sidecars.push(await startSidecar(config, { adminToken: TOKEN, instance }))
    }
    await waitUntil(() => sidecars.every((s) => s.fleet?.connected === true), 30_000)
    o.out(`  ${sidecars.filter((s) => s.fleet?.connected === true).length}/${n} sidecars connected to etcd\n\n`)
    step()

    // 1. A fleet kill switch: one command, every sidecar.
    const adminRequest = async (admin: string, method: 'PUT' | 'DELETE', body: Record<string, unknown>): Promise<void> => {
      const res = await fetch(`${admin}/v1/flags/newCheckout`, { method, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify(body) })
      await res.body?.cancel()
      if (!res.ok) throw new Error(`${method} /v1/flags/newCheckout answered ${res.status}`)
    }
    const restoreEverywhere = async (): Promise<void> => {
      await adminRequest(sidecars[1]?.addresses.admin ?? '', 'DELETE', { reason: 'drill: restore', scope: 'fleet' })
      await waitUntil(() => sidecars.every((s) => s.flags.enabled('newCheckout')), 10_000)
    }
    const propagation = await timeKillSwitch(sidecars, async () => {
      await adminRequest(sidecars[0]?.addresses.admin ?? '', 'PUT', { enabled: false, reason: 'drill: fleet kill switch', scope: 'fleet' })
    })
    o.out(`Fleet kill switch (kill newCheckout --fleet): in force on ${propagation.reached}/${n} sidecars\n`)
    o.out(`  from the admin API request: ${propagationLine(propagation)}\n`)
    await restoreEverywhere()
    step()
    let cliPropagation: Propagation | null = null
    const command = o.command
    if (command !== undefined) {
      // The same, from the operator's command: a new `breakwater` process (Node's start-up included).
      const env = { ...command.env, BREAKWATER_ADMIN_TOKEN: TOKEN, BREAKWATER_CONFIG: '' }
      cliPropagation = await timeKillSwitch(sidecars, async () => {
        await run(command.argv, ['kill', 'newCheckout', '--fleet', '--reason', 'drill: fleet kill switch from the CLI', '--admin', sidecars[0]?.addresses.admin ?? ''], env, root)
      })
      o.out(`  from the CLI command (breakwater kill newCheckout --fleet, in force on ${cliPropagation.reached}/${n}): ${propagationLine(cliPropagation)} (target p99 <= 1000 ms)\n`)
      await restoreEverywhere()
    }
    for (const p of [propagation, cliPropagation]) if (p !== null && p.reached !== n) failures.push(`the fleet kill switch reached ${p.reached}/${n} sidecars`)

    step()
    // 2. One etcd member dies: nothing changes.
    await etcd.kill(2)
    await new Promise((resolve) => setTimeout(resolve, 3000))
    const connectedAfterMemberLoss = sidecars.filter((s) => s.fleet?.connected === true).length
    o.out(`\nKilled etcd member m2: ${connectedAfterMemberLoss}/${n} sidecars still connected, fleet state unchanged\n`)
    if (connectedAfterMemberLoss !== n) failures.push(`${n - connectedAfterMemberLoss} sidecars lost etcd with one member of three gone`)

    step()
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
    o.out(`\nBad release of /checkout: half of its requests fail on every sidecar; a rollback takes ${DEPLOY_MS / 1000} s to deploy\n`)
    // The rollback webhook is called at once; the previous release is live DEPLOY_MS later.
    const deploy = waitUntil(() => demo.rollbacks > 0 || o.signal?.aborted === true, timeout).then(async () => {
      await new Promise((resolve) => setTimeout(resolve, DEPLOY_MS))
      demo.bad = false
    })
    const leader = (): Sidecar | undefined => sidecars.find((s) => s.verifier.incidents.some((i) => i.fleet?.role === 'leader' && i.restoredAt !== null))
    await waitUntil(() => leader() !== undefined || o.signal?.aborted === true, timeout)
    step()
    const incident = leader()?.verifier.incidents.find((i) => i.fleet?.role === 'leader')
    const restored = incident?.status === 'restored'
    const timeToRestoreSeconds = incident?.restoredAt == null ? null : (Date.parse(incident.restoredAt) - onset) / 1000
    // Every sidecar resolves its alert (verified, or its trigger re-armed); Alertmanager says so once.
    type Notification = { status: string, groupLabels?: Record<string, string>, alerts: Array<{ labels: Record<string, string> }> }
    const notifications = (): Notification[] => ((counter.bodies.get('/alertmanager') ?? []) as Notification[]).filter((x) => x.groupLabels?.trigger === TRIGGER)
    await waitUntil(() => notifications().some((x) => x.status === 'resolved'), timeout)
    // The leader's restoration messages may still be on their way.
    await waitUntil(() => { const d = deliveredFor(counter.bodies, () => true); return CHANNELS.every((c) => d[c] >= EXPECTED_DELIVERIES[c]) }, 10_000)
    await deploy
    const all = notifications()
    const firing = all.filter((x) => x.status === 'firing')
    const deliveries = deliveredFor(counter.bodies, () => true)
    const fromFollowers = deliveredFor(counter.bodies, (instance) => instance !== incident?.fleet?.leader)
    const followerDeliveries = CHANNELS.reduce((sum, c) => sum + fromFollowers[c], 0)
    const result: FleetDrillResult = {
      propagation,
      cliPropagation,
      connectedAfterMemberLoss,
      rollbackCalls: demo.rollbacks,
      alertmanagerNotifications: firing.length,
      deliveries,
      followerDeliveries,
      restored,
      timeToRestoreSeconds,
      failures
    }
    const followers = sidecars.filter((s) => s.verifier.incidents.some((i) => i.fleet?.role === 'follower')).length
    o.out(`  incident leader: ${incident?.fleet?.leader ?? 'none'}; ${followers} followers\n`)
    o.out(`  rollback calls: ${result.rollbackCalls} (target 1)\n`)
    o.out(`  Alertmanager notifications while firing: ${result.alertmanagerNotifications} (target 1; ${firing[0]?.alerts.length ?? 0} alerts grouped), then ${all.length - firing.length} resolved\n`)
    const expected = EXPECTED_DELIVERIES
    o.out(`  Slack/PagerDuty/webhook deliveries for the incident: Slack ${deliveries.slack}, PagerDuty ${deliveries.pagerduty}, webhook ${deliveries.webhook} (expected ${expected.slack}, ${expected.pagerduty}, ${expected.webhook}: fired, rolled back, restored; PagerDuty trigger and resolve), ${followerDeliveries === 0 ? 'all from the leader' : `${followerDeliveries} from followers`}\n`)
    if (result.rollbackCalls !== 1) failures.push(`${result.rollbackCalls} rollback calls, not 1`)
    if (result.alertmanagerNotifications !== 1) failures.push(`${result.alertmanagerNotifications} Alertmanager notifications while firing, not 1`)
    for (const c of CHANNELS) if (deliveries[c] !== expected[c]) failures.push(`${deliveries[c]} ${c} deliveries, not ${expected[c]}`)
    if (followerDeliveries !== 0) failures.push(`${followerDeliveries} deliveries from followers, not 0`)
    if (!restored) failures.push('service was not restored')
    o.out(restored ? `\nFleet restored ${timeToRestoreSeconds?.toFixed(1) ?? '?'} s after the bad release (target: under 10 s).\n` : '\nService was NOT restored.\n')
    if (failures.length > 0) o.out(`\nDrill FAILED: ${failures.join('; ')}.\n`)
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
