import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { ESLint } from 'eslint';
import { describe, expect, it } from 'vitest';

// The repo's own eslint.config.js, run on made-up files: the layering rule is what CI enforces.
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const eslint = new ESLint({ cwd: ROOT });

/** The no-restricted-imports messages ESLint reports for `code` placed at `file` (repo-relative). */
async function layeringErrors(file: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(`${code}\nexport const used = x;\n`, {
    filePath: path.join(ROOT, file),
  });
  return (result?.messages ?? []).filter((m) => m.ruleId === 'no-restricted-imports').map((m) => m.message);
}

describe('imports point down', () => {
  it.each([
    ['src/store/x.ts', "import { x } from '../gateway/gateway.js';"],
    ['src/store/central/x.ts', "import type { x } from '../../gateway/http/status.js';"],
    ['src/store/x.ts', "import { x } from '../providers/provider.js';"],
    ['src/common/x.ts', "import { x } from '../store/outbox.js';"],
    ['src/common/x.ts', "import { x } from '../providers/provider.js';"],
    ['src/common/x.ts', "import { x } from '../gateway/delivery/forwarder.js';"],
    ['src/config/x.ts', "import { x } from '../gateway/gateway.js';"],
    ['src/config/x.ts', "import { x } from '../store/database.js';"],
    ['src/config/x.ts', "import { x } from '../providers/mqtt/mqtt-provider.js';"],
    ['src/providers/mqtt/x.ts', "import { x } from '../../gateway/delivery/forwarder.js';"],
    ['src/providers/x.ts', "export { x } from '../gateway/gateway.js';"],
    ['src/providers/x.ts', "import type { x } from '../store/activity-log.js';"],
    ['src/providers/aws-iot/x.ts', "import { x } from '../../store/outbox.js';"],
  ])('%s may not %s', async (file, code) => {
    expect(await layeringErrors(file, code)).toHaveLength(1);
  });

  it.each([
    ['src/gateway/x.ts', "import { x } from '../store/outbox.js';"],
    ['src/gateway/delivery/x.ts', "import { x } from '../../providers/provider.js';"],
    ['src/providers/mqtt/x.ts', "import { x } from '../../common/topic-match.js';"],
    ['src/providers/mqtt/x.ts', "import { x } from '../../config/units.js';"],
    ['src/store/x.ts', "import { x } from '../common/outbound-message.js';"],
    ['src/store/x.ts', "import { x } from '../config/schema.js';"],
    ['src/config/x.ts', "import { x } from '../providers/settings.js';"],
    ['src/config/x.ts', "import { x } from '../providers/mqtt/settings.js';"],
    ['src/common/x.ts', "import { x } from '../errors.js';"],
  ])('%s may %s', async (file, code) => {
    expect(await layeringErrors(file, code)).toEqual([]);
  });
});
