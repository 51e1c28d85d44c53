/**
 * Parity: one corpus of flagd targeting rules and request contexts, decided by the kill-switch
 * stage of a real sidecar (through a flag file, and through the real flagd provider) and by
 * flagd-core called directly. Every decision must be the same.
 */
import t from 'tap'
import type { Test } from 'tap'
import { join } from 'node:path'
import { Client } from 'undici'
import { FlagdCore } from '@openfeature/flagd-core'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { flagDir, flagdText, writeFlagFile, type FlagDef } from './helpers/flags.js'

const evaluators = {
  isBeta: { starts_with: [{ var: 'path' }, '/beta'] },
  isStaff: { ends_with: [{ var: 'targetingKey' }, '@staff.example'] }
}

const corpus: Record<string, FlagDef> = {
  fractionalByKey: { targeting: { fractional: [['on', 50], ['off', 50]] } },
  fractionalWeighted: { targeting: { fractional: [['on', 25], ['off', 75]] } },
  fractionalByPath: { targeting: { fractional: [{ cat: [{ var: '$flagd.flagKey' }, { var: 'path' }] }, ['on', 50], ['off', 50]] } },
  ifIn: { targeting: { if: [{ in: [{ var: 'targetingKey' }, ['u1', 'u3', 'u5']] }, 'off', 'on'] } },
  inSubstring: { targeting: { if: [{ in: ['admin', { var: 'path' }] }, 'off', null] } },
  startsEnds: { targeting: { if: [{ and: [{ starts_with: [{ var: 'path' }, '/api'] }, { ends_with: [{ var: 'path' }, '.json'] }] }, 'off', null] } },
  semVer: { targeting: { if: [{ sem_ver: [{ var: 'targetingKey' }, '>=', '2.0.0'] }, 'off', 'on'] } },
  semVerCaret: { targeting: { if: [{ sem_ver: [{ var: 'targetingKey' }, '^', '1.2.0'] }, 'on', 'off'] } },
  refs: { targeting: { if: [{ or: [{ $ref: 'isBeta' }, { $ref: 'isStaff' }] }, 'off', null] } },
  methodHost: { targeting: { if: [{ and: [{ '==': [{ var: 'method' }, 'POST'] }, { '!=': [{ var: 'host' }, 'internal.example'] }] }, 'off', 'on'] } },
  elseIf: { targeting: { if: [{ '==': [{ var: 'targetingKey' }, 'u1'] }, 'on', { '<': [{ var: '$flagd.timestamp' }, 4102444800] }, 'off', 'on'] } },
  noKeyIsNull: { targeting: { if: [{ '===': [{ var: 'targetingKey' }, null] }, 'off', 'on'] } },
  flagKey: { targeting: { if: [{ '==': [{ var: '$flagd.flagKey' }, 'flagKey'] }, 'off', 'on'] } },
  noDefaultVariant: { defaultVariant: null, targeting: { if: [{ '==': [{ var: 'targetingKey' }, 'u2'] }, 'on', null] } },
  unknownVariant: { targeting: { if: [{ '==': [{ var: 'targetingKey' }, 'u4'] }, 'nonexistent', 'on'] } },
  disabledTargeted: { state: 'DISABLED', defaultVariant: 'off', targeting: { if: [true, 'off', 'off'] } }
}

/** Code defaults (flagd's fallback): these differ from "on" so a fallback is visible. */
const featureFlags = { noDefaultVariant: false, unknownVariant: false, disabledTargeted: false }

const keys = [undefined, 'u1', 'u2', 'u3', 'u4', 'u5', 'u6', 'alice@staff.example', '1.2.3', '1.9.0', '2.0.0', '2.1.0-beta', '3.0.0', 'not-a-version']
const paths = ['/', '/beta/x', '/api/v1/items.json', '/api/v1/items', '/admin/panel', '/shop/cart']
const methods = ['GET', 'POST']
const hosts = ['shop.example', 'internal.example']

interface Case { flag: string, targetingKey: string | undefined, path: string, method: string, host: string }

function cases (): Case[] {
  const out: Case[] = []
  let i = 0
  for (const flag of Object.keys(corpus)) {
    for (const targetingKey of keys) {
      for (const path of paths) {
        out.push({ flag, targetingKey, path, method: methods[i % 2] as string, host: hosts[(i >> 1) % 2] as string })
        i++
      }
    }
  }
  return out
}

async function runCorpus (t: Test, source: 'file' | 'provider'): Promise<void> {
  const up = await startUpstream()
  t.teardown(up.close)
  const path = join(flagDir(t), 'flags.json')
  writeFlagFile(path, corpus, evaluators)
  const core = new FlagdCore()
  core.setConfigurations(flagdText(corpus, evaluators))
  const { proxy, sidecar } = await startTestSidecar(t, {
    upstreams: { app: { url: up.url } },
    // One route per flag, chosen by a header, so the path stays free to vary.
    routes: Object.keys(corpus).map((flag) => ({ name: flag, match: { pathPrefix: '/', headers: { 'x-flag': flag } }, upstream: 'app', killSwitch: flag })),
    featureFlags,
    flags: { targetingKeyHeader: 'x-user' },
    ...(source === 'file'
      ? { flagSource: { type: 'flagd-file', path } }
      : { flagProvider: { module: '@openfeature/flagd-provider', export: 'FlagdProvider', options: { resolverType: 'in-process', offlineFlagSourcePath: path } } })
  })
  t.equal(sidecar.flags.targeted?.size, Object.keys(corpus).length - 1, 'every ENABLED flag of the corpus is evaluated per request')

  const client = new Client(proxy)
  t.teardown(async () => { await client.close() })
  const mismatches: string[] = []
  const seen = new Map<string, Set<boolean>>()
  let allowed = 0
  const all = cases()
  for (const c of all) {
    const want = core.resolveBooleanEvaluation(c.flag, Object.hasOwn(featureFlags, c.flag) ? featureFlags[c.flag as keyof typeof featureFlags] : true,
      c.targetingKey === undefined ? { path: c.path, method: c.method, host: c.host } : { targetingKey: c.targetingKey, path: c.path, method: c.method, host: c.host }).value
    const headers: Record<string, string> = { 'x-flag': c.flag, host: c.host }
    if (c.targetingKey !== undefined) headers['x-user'] = c.targetingKey
    const res = await client.request({ path: c.path, method: c.method, headers })
    await res.body.dump()
    const got = res.statusCode === 200
    if (res.statusCode !== 200 && res.statusCode !== 503) mismatches.push(`${JSON.stringify(c)}: status ${res.statusCode}`)
    else if (got !== want) mismatches.push(`${JSON.stringify(c)}: sidecar ${got ? 'on' : 'off'}, flagd-core ${want ? 'on' : 'off'}`)
    if (got) allowed++
    const outcomes = seen.get(c.flag) ?? new Set<boolean>()
    outcomes.add(want)
    seen.set(c.flag, outcomes)
  }
  t.same(mismatches, [], `${all.length} decisions, all identical to flagd-core's`)
  t.equal(up.received.length, allowed, 'the upstream saw exactly the requests let through')
  const both = [...seen].filter(([, o]) => o.size === 2).map(([flag]) => flag)
  t.ok(both.length >= 12, `the corpus exercises both outcomes for most flags (${both.join(', ')})`)
}

t.test('parity with flagd-core: a flag file', async (t) => { await runCorpus(t, 'file') })
t.test('parity with flagd-core: the flagd provider, in-process', async (t) => { await runCorpus(t, 'provider') })
