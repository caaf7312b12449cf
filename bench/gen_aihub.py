#!/usr/bin/env python3
"""Generate a synthetic corpus in the layout of AIHub dataset 543 for benchmarking
`chingu prepare`: TL_*/VL_* folders, one JSON file per dialogue, the real field set
(`info[].annotations.lines[].norm_text`, speakers, speech acts), system placeholder lines.

The Korean is random but word-shaped (stems, particles, endings from small lists), so the
tokenizer trainer sees a realistic number of distinct words and nearly every pair is unique.
Deterministic for a given --seed.

usage: gen_aihub.py OUT_DIR [--pairs 1000000] [--seed 1]
"""

import argparse
import json
import os
import random

STEMS = (
    "오늘 내일 어제 주말 아침 점심 저녁 회사 학교 친구 가족 엄마 아빠 동생 언니 형 누나 오빠 "
    "강아지 고양이 영화 음악 노래 책 게임 운동 산책 여행 바다 산 카페 커피 라면 김치 치킨 피자 "
    "떡볶이 비빔밥 날씨 비 눈 바람 햇살 버스 지하철 택시 공원 도서관 시험 숙제 과제 발표 회의 "
    "월급 휴가 생일 선물 옷 신발 가방 휴대폰 사진 드라마 예능 뉴스 병원 약 감기 두통 잠 꿈 "
    "기분 마음 생각 계획 약속 연락 문자 전화 이야기 고민 걱정 행복 사랑 시간 돈 집 방 청소 "
    "빨래 요리 설거지 장보기 마트 시장 편의점 택배 주문 배달 노트북 컴퓨터 인터넷 유튜브"
).split()
PARTICLES = ["은", "는", "이", "가", "을", "를", "에", "에서", "도", "만", "이랑", "하고", "보다", "까지", ""]
VERBS = (
    "가 오 먹 보 하 자 놀 읽 듣 사 만나 쉬 일하 공부하 운동하 청소하 좋아하 싫어하 기다리 "
    "생각하 준비하 끝내 시작하 찾 잃어버리 고르 마시 타 걷 달리 웃 울 이야기하"
).split()
ENDINGS = [
    "었어", "었어?", "을래?", "고 싶어", "자", "는 중이야", "ㄹ 거야", "면 좋겠다", "었는데",
    "어요", "었어요", "을까요?", "네요", "죠?", "고 있어", "기 싫어", "야 돼", "려고 해",
    "는 거 어때?", "았으면 해", "더라", "잖아", "지 마", "ㄹ게", "었지?",
]
ADVERBS = "진짜 너무 조금 많이 빨리 천천히 같이 혼자 다시 벌써 아직 정말 그냥 좀 꼭 자주 가끔".split()
SYSTEM_LINES = ["#@시스템#사진#", "#@시스템#동영상#", "#@시스템#검색#", "#@이모티콘#"]
CATEGORIES = ["일상대화", "건강", "여가", "일과직업", "쇼핑", "주거와생활", "식음료", "교육"]


# Common syllables for made-up nouns (names, places, slang): real chat has tens of thousands of
# distinct words, and the tokenizer trainer's memory and the encoder's speed depend on that.
SYLLABLES = list(
    "가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초코토포호구누두루무부수우주추"
    "쿠투푸후기니디리미비시이지치키티피히개내대래매배새애재채태패해게네데레메베세에제체케테페헤민진빈신인린현준"
    "선연영정성경명상강장방광당랑망창탕항동송공종용봉홍통롱몽철혁훈윤은순균근늘달별솔울율빛숲꽃잎"
)


def make_nouns(seed, count=20000):
    rng = random.Random(seed)
    return sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(count)})


NOUNS = make_nouns(543)


def sentence(rng):
    words = []
    for _ in range(rng.randint(1, 4)):
        stem = rng.choice(STEMS) if rng.random() < 0.6 else rng.choice(NOUNS)
        words.append(stem + rng.choice(PARTICLES))
        if rng.random() < 0.3:
            words.append(rng.choice(ADVERBS))
    words.append(rng.choice(VERBS) + rng.choice(ENDINGS))
    if rng.random() < 0.15:
        words.append(str(rng.randint(1, 999)) + rng.choice(["개", "번", "시", "분", "원", "명"]))
    return " ".join(words)


def dialogue(rng, did, n_lines, two_party):
    speakers = 2 if two_party else rng.randint(3, 4)
    lines = []
    speaker = 1
    for i in range(n_lines):
        if rng.random() < 0.7:
            speaker = speaker % speakers + 1
        text = rng.choice(SYSTEM_LINES) if rng.random() < 0.03 else sentence(rng)
        lines.append({
            "id": i + 1,
            "text": f"{speaker} : {text}",
            "norm_text": text,
            "speaker": {"id": f"{speaker}번", "sex": rng.choice(["여성", "남성"]), "age": f"{rng.randint(2, 6)}0대"},
            "speechAct": rng.choice(["(지시) 질문하기", "(표현) 진술하기", "(단언) 주장하기", "(지시) 요구하기"]),
        })
    return {
        "id": did,
        "filename": f"KAKAO_{did}.txt",
        "title": f"KAKAO_{did}",
        "mediatype": "SNS",
        "medianame": "카카오톡",
        "category": rng.choice(CATEGORIES),
        "annotations": {
            "subject": rng.choice(STEMS),
            "speaker_type": "1:1" if two_party else f"{speakers}인 이상",
            "text": "\n".join(l["text"] for l in lines),
            "lines": lines,
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    # Lines per dialogue 6..16; consecutive same-speaker lines merge, so count pairs as the
    # reader will: turns - 1.
    pairs = 0
    did = 0
    files_per_dir = 5000
    while pairs < args.pairs:
        d = dialogue(rng, did, rng.randint(6, 16), rng.random() < 0.85)
        turns = 0
        prev = None
        for line in d["annotations"]["lines"]:
            if line["norm_text"] in SYSTEM_LINES:
                continue
            if line["speaker"]["id"] != prev:
                turns += 1
            prev = line["speaker"]["id"]
        pairs += max(turns - 1, 0)
        split = "VL_01. KAKAO" if did % 10 == 9 else "TL_01. KAKAO"
        folder = os.path.join(args.out, "Validation" if split.startswith("VL") else "Training", split, f"{did // files_per_dir:04d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"KAKAO_{did:07d}.json"), "w", encoding="utf-8") as f:
            json.dump({"dataset": {"identifier": "bench"}, "info": [d]}, f, ensure_ascii=False, indent=1)
        did += 1
    print(f"{did} dialogues, {pairs} pairs in {args.out}")


if __name__ == "__main__":
    main()
