import { describe, expect, it } from 'vitest';
import { matchTopic } from '../../src/common/topic-match.js';

describe('matchTopic', () => {
  it.each([
    ['devices/+/telemetry', 'devices/s1/telemetry', ['s1']],
    ['devices/+/telemetry', 'devices/s1/telemetry/x', null],
    ['devices/+/telemetry', 'devices/s1', null],
    ['devices/+/+', 'devices/s1/state', ['s1', 'state']],
    ['devices/#', 'devices/s1/telemetry/temp', ['s1/telemetry/temp']],
    ['devices/#', 'devices', ['']], // '#' also matches the parent level
    ['devices/s1/#', 'devices/s2/telemetry', null],
    ['#', 'a/b/c', ['a/b/c']],
    ['+/+/#', 'a/b/c/d', ['a', 'b', 'c/d']],
    ['a/b', 'a/b', []],
    ['a/b', 'a/b/', null],
    ['a/+', 'a/', ['']], // an empty level is a level
    ['+', '/a', null],
    ['+/a', '/a', ['']],
    ['Devices/+', 'devices/x', null], // case sensitive
  ])('%s against %s', (filter, topic, expected) => {
    expect(matchTopic(filter, topic)).toEqual(expected);
  });

  it('keeps $-topics away from leading wildcards but matches them literally', () => {
    expect(matchTopic('#', '$SYS/broker/clients')).toBeNull();
    expect(matchTopic('+/broker/clients', '$SYS/broker/clients')).toBeNull();
    expect(matchTopic('$SYS/#', '$SYS/broker/clients')).toEqual(['broker/clients']);
    expect(matchTopic('$aws/things/+/shadow/#', '$aws/things/t1/shadow/update')).toEqual(['t1', 'update']);
    expect(matchTopic('a/+', 'a/$x')).toEqual(['$x']); // only the first level is special
  });
});
