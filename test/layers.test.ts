/**
 * Dependencies point one way: `config/` is read by everyone and reads nobody (it is parsed
 * before anything else exists); `proxy/` knows nothing of `control/`.
 */
import t from 'tap'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { ROOT } from './helpers/root.js'

/** The relative imports of every file in `src/<folder>`, as `file: specifier`. */
function importsOf (folder: string): string[] {
  const dir = join(ROOT, 'src', folder)
  const out: string[] = []
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.ts'))) {
    const text = readFileSync(join(dir, file), 'utf8')
    for (const m of text.matchAll(/^(?:import|export)[^'"]*from '(\.[^']+)'/gm)) out.push(`${file}: ${m[1] as string}`)
  }
  return out
}

t.test('config/ imports nothing outside config/', async (t) => {
  const imports = importsOf('config')
  t.ok(imports.length > 0, 'the scan finds the relative imports')
  t.same(imports.filter((i) => !/: \.\/[^/]+$/.test(i)), [], 'every relative import stays in the folder')
})

t.test('proxy/ does not import control/', async (t) => {
  t.same(importsOf('proxy').filter((i) => i.includes('/control/')), [])
})

t.test('ops/ reads the control plane and flags through small interfaces, never their classes', async (t) => {
  t.same(importsOf('ops').filter((i) => i.includes('/control/') || i.includes('/flags/')), [])
})
