import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { stringify } from 'yaml'
import type { Test } from 'tap'
import { runCli, tempDir } from './helpers/process.js'
import { flagdText } from './helpers/flags.js'

// Each test spawns `breakwater validate`: run them side by side.
t.jobs = 2

const cleanEnv: NodeJS.ProcessEnv = { BREAKWATER_CONFIG: undefined }

/** Write a config (and whatever else `files` holds) into a temp dir; returns the config path. */
function setUp (t: Test, extra: Record<string, unknown>, files: Record<string, string> = {}): string {
  const dir = tempDir(t)
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  const path = join(dir, 'breakwater.yaml')
  writeFileSync(path, stringify({
    service: 'checkout',
    upstreams: { app: { url: 'http://127.0.0.1:3000' } },
    routes: [{ match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'enableNewCheckout' }, { match: { pathPrefix: '/' }, upstream: 'app' }],
    featureFlags: { enableNewCheckout: true },
    ...extra
  }))
  return path
}

async function validate (path: string): Promise<{ code: number | null, problems: string[], stdout: string }> {
  const r = await runCli(['validate', '--config', path], { env: cleanEnv })
  return { code: r.code, problems: r.stderr.split('\n').filter((l) => l !== ''), stdout: r.stdout }
}

t.test('validate fails on a flag file it cannot parse, naming the file and the problem', async (t) => {
  const path = setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': '{ "flags": { "enableNewCheckout": ' })
  const r = await validate(path)
  t.equal(r.code, 1)
  t.equal(r.problems.length, 1, r.problems.join('\n'))
  t.match(r.problems[0], /^flagSource\.path: \/\S+\/flags\.json is not a valid flag file: not valid JSON/)
})

t.test('validate fails on a flag file whose shape is wrong', async (t) => {
  const path = setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': JSON.stringify({ flags: { enableNewCheckout: { state: 'ON', variants: { on: true } } } }) })
  const r = await validate(path)
  t.equal(r.code, 1)
  t.match(r.problems.join('\n'), /flagSource\.path: \S+flags\.json is not a valid flag file: flags\.enableNewCheckout\.state: must be "ENABLED" or "DISABLED"/)
})

t.test('validate fails on a defaultVariant that names no variant but an object built-in (constructor, toString)', async (t) => {
  const path = setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': JSON.stringify({ flags: { enableNewCheckout: { state: 'ENABLED', variants: { on: true, off: false }, defaultVariant: 'constructor' } } }) })
  const r = await validate(path)
  t.equal(r.code, 1)
  t.match(r.problems.join('\n'), /flags\.enableNewCheckout\.defaultVariant: must name one of its variants/)
})

t.test('validate fails on a targeting rule flagd cannot compile, naming the flag', async (t) => {
  const text = flagdText({ enableNewCheckout: { targeting: { if: [{ no_such_operator: [{ var: 'path' }, '/x'] }, 'off', null] } } })
  const path = setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': text })
  const r = await validate(path)
  t.equal(r.code, 1)
  t.match(r.problems.join('\n'), /^flagSource\.path: \S+flags\.json: flag "enableNewCheckout": flagd cannot compile its targeting/m)
})

t.test('validate accepts targeting flagd compiles ($evaluators, fractional, sem_ver), and a missing flag file stays a warning', async (t) => {
  const text = flagdText({
    enableNewCheckout: { targeting: { if: [{ $ref: 'beta' }, { fractional: [['on', 50], ['off', 50]] }, null] } },
    legacy: { targeting: { if: [{ sem_ver: [{ var: 'targetingKey' }, '>=', '2.0.0'] }, 'off', 'on'] } }
  }, { beta: { starts_with: [{ var: 'path' }, '/checkout/beta'] } })
  const ok = await validate(setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': text }))
  t.equal(ok.code, 0, ok.problems.join('\n'))
  t.match(ok.stdout, /valid/)
  t.notOk(ok.problems.some((l) => /targeting/.test(l)), 'no warning that targeting is ignored: it is evaluated')

  const missing = await validate(setUp(t, { flagSource: { type: 'flagd-file', path: './absent.json' } }))
  t.equal(missing.code, 0)
  t.match(missing.problems.join('\n'), /^warning: flagSource\.path: \S+absent\.json does not exist yet/m)
})

t.test('flagProvider: an unknown module or export is a validate error naming the key; the real flagd provider validates', async (t) => {
  const unknown = await validate(setUp(t, { flagProvider: { module: '@example/no-such-provider', options: {} } }))
  t.equal(unknown.code, 1)
  t.match(unknown.problems.join('\n'), /^flagProvider\.module: cannot find "@example\/no-such-provider"/m)

  const noFile = await validate(setUp(t, { flagProvider: { module: './nowhere/provider.mjs' } }))
  t.equal(noFile.code, 1)
  t.match(noFile.problems.join('\n'), /^flagProvider\.module: \/\S+\/nowhere\/provider\.mjs does not exist/m)

  const noExport = await validate(setUp(t, { flagProvider: { module: '@openfeature/flagd-provider' } }))
  t.equal(noExport.code, 1)
  t.match(noExport.problems.join('\n'), /^flagProvider\.export: "@openfeature\/flagd-provider" has no default export that is a provider class; name one of: FlagdProvider$/m)

  const badKey = await validate(setUp(t, { flagProvider: { module: '@openfeature/flagd-provider', export: 'FlagdProvider', pollEvery: 5 } }))
  t.equal(badKey.code, 1)
  t.match(badKey.problems.join('\n'), /^flagProvider\.pollEvery: unknown key/m)

  const flagd = await validate(setUp(t, {
    flagProvider: { module: '@openfeature/flagd-provider', export: 'FlagdProvider', options: { resolverType: 'in-process', offlineFlagSourcePath: '/etc/flags.json' }, pollMs: '30s' },
    flags: { targetingKeyHeader: 'x-user-id' },
    routes: [{ match: { pathPrefix: '/' }, upstream: 'app', killSwitch: 'onlyInTheProvider' }]
  }))
  t.equal(flagd.code, 0, flagd.problems.join('\n'))
})

t.test('validate fails on a kill switch whose variants in the flag file are strings, not booleans', async (t) => {
  // `"off": "false"` is a string: flagd would resolve it, Breakwater reads booleans only, and the
  // route's kill switch would silently stay on whatever the file says.
  const file = JSON.stringify({ flags: { enableNewCheckout: { state: 'ENABLED', variants: { on: 'true', off: 'false' }, defaultVariant: 'off' }, theme: { state: 'ENABLED', variants: { dark: 'dark', light: 'light' }, defaultVariant: 'dark' } } })
  const path = setUp(t, { flagSource: { type: 'flagd-file', path: './flags.json' } }, { 'flags.json': file })
  const r = await validate(path)
  t.equal(r.code, 1)
  t.equal(r.problems.length, 1, r.problems.join('\n'))
  t.match(r.problems[0], /^flagSource\.path: \S+flags\.json is not a valid flag file: flags\.enableNewCheckout\.variants: must be true and false \(booleans, not strings\)/)
  t.notMatch(r.problems[0], /theme/, "a string flag the config does not use is someone else's")
})
